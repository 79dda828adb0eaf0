"""Fake quantization for QAT: bnbx's fused kernel against torch's built-in fake_quantize and plain torch, one table.

    python benchmarks/bench_qat.py [--repeat 7] [--threads N] [--quick]

Rows: a 4096x11008 weight per output channel and 2048x4096 activations per token, symmetric int8 (restricted
range, dynamic MinMax scales), fp32 and bf16; forward, and forward+backward (straight-through gradient).
Columns:
- ms: median wall time (time.perf_counter) after a warm-up, alternating between 2 copies of the input.
- GB/s: one read of the input and one write of the output (forward), plus one read of the gradient and one
  write of the input's gradient (forward+backward), over the time.
- % copy: that rate over this machine's copy bandwidth (a same-sized .copy_, bytes read + written), measured
  in the same run.
- vs built-in: torch.fake_quantize_per_channel_affine (also for per token: one scale per row) with the MinMax
  scales computed by plain torch first (the built-in takes scales; it has no dynamic mode) / bnbx time.
- vs plain: a plain-torch MinMax fake quantization (amax, multiply by the reciprocal, round, clamp, multiply;
  gradient by the detach trick) / bnbx time.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch

import bnbx  # noqa: F401
from bnbx import _library
from bnbx.qat import fake_quantize

QMAX = 127


def median_ms(fn, inputs, repeat: int) -> float:
    fn(inputs[0])
    times = []
    for i in range(repeat):
        start = time.perf_counter()
        fn(inputs[i % len(inputs)])
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def minmax_scale(x: torch.Tensor, dim: int) -> torch.Tensor:
    return (x.detach().abs().amax(dim=1 - dim).float() / QMAX).clamp_min(1e-12)


def builtin(x: torch.Tensor) -> torch.Tensor:
    scale = minmax_scale(x, 0)
    zero_point = torch.zeros_like(scale, dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(x, scale, zero_point, 0, -QMAX, QMAX)


def plain(x: torch.Tensor) -> torch.Tensor:
    scale = (x.abs().amax(dim=1, keepdim=True).float() / QMAX).clamp_min(1e-12).detach()
    q = (torch.clamp(torch.round(x.float() * (1.0 / scale)), -QMAX, QMAX) * scale).to(x.dtype)
    return x + (q - x).detach()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="small shapes (a smoke run)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = [("weight 4096x11008 per channel", (4096, 11008), "channel"),
             ("activations 2048x4096 per token", (2048, 4096), "token")]
    if args.quick:
        cases = [(name, (shape[0] // 16, shape[1] // 16), g) for name, shape, g in cases]
    print(f"bnbx fake_quantize, CPU ({_library.cpu_capability()}), {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, median of {args.repeat}")
    header = f"| {'case':34} | {'dtype':5} | {'pass':7} | {'bnbx ms':>8} | {'GB/s':>6} | {'% copy':>6} | " \
             f"{'built-in ms':>11} | {'vs built-in':>11} | {'plain ms':>8} | {'vs plain':>8} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for name, shape, granularity in cases:
        for dtype in (torch.float32, torch.bfloat16):
            inputs = [torch.randn(shape, dtype=dtype) for _ in range(2)]
            nbytes = inputs[0].numel() * inputs[0].element_size()
            out = torch.empty_like(inputs[0])
            copy_ms = median_ms(out.copy_, inputs, args.repeat)
            copy_gbs = 2 * nbytes / copy_ms / 1e6
            ours = functools.partial(fake_quantize, bits=8, symmetric=True, granularity=granularity)
            for pass_name in ("fwd", "fwd+bwd"):
                if pass_name == "fwd":
                    run = lambda fn: fn  # noqa: E731
                    moved = 2 * nbytes
                    grad_inputs = inputs
                else:
                    grad = torch.randn(shape, dtype=dtype)
                    grad_inputs = [t.clone().requires_grad_() for t in inputs]

                    def run(fn, grad=grad):
                        def step(x):
                            x.grad = None
                            fn(x).backward(grad)
                        return step

                    moved = 4 * nbytes
                ms = median_ms(run(ours), grad_inputs, args.repeat)
                try:
                    builtin_ms = median_ms(run(builtin), grad_inputs, max(3, args.repeat // 2))
                    builtin_text, ratio = f"{builtin_ms:11.2f}", f"{builtin_ms / ms:10.1f}x"
                except RuntimeError:
                    builtin_text, ratio = f"{'n/a':>11}", f"{'n/a':>11}"
                plain_ms = median_ms(run(plain), grad_inputs, max(3, args.repeat // 2))
                gbs = moved / ms / 1e6
                print(f"| {name:34} | {str(dtype)[6:]:5} | {pass_name:7} | {ms:8.2f} | {gbs:6.1f} | "
                      f"{gbs / copy_gbs * 100:5.0f}% | {builtin_text} | {ratio} | {plain_ms:8.2f} | "
                      f"{plain_ms / ms:7.1f}x |")
            print(f"|   copy bandwidth ({str(dtype)[6:]} {shape[0]}x{shape[1]}) | | | {copy_ms:8.2f} | "
                  f"{copy_gbs:6.1f} | 100% | | | | |")


if __name__ == "__main__":
    main()
