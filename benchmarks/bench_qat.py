"""Fake quantization for QAT: bnbx's fused kernel against torch's built-in fake_quantize and plain torch, one table.

    python benchmarks/bench_qat.py [--repeat 7] [--threads N] [--quick]

Rows: a 4096x11008 weight per output channel and 2048x4096 activations per token, symmetric int8 (restricted
range, dynamic MinMax scales), fp32 and bf16; forward, and forward+backward (straight-through gradient). LSQ rows:
the 4096x11008 weight with a learned fp32 scale per output channel (4 bits, bnbx.qat.fake_quantize_lsq), forward
and forward+backward (gradients of the weight and of the scale).
Columns:
- ms: median wall time (time.perf_counter) after a warm-up, alternating between 2 copies of the input.
- fwd+bwd: the forward, then torch.autograd.grad of the output (with a given gradient) with respect to the input
  (and the LSQ scale). Not .backward(): its AccumulateGrad clones a gradient the caller still holds into fresh
  memory (11 ms for the fp32 activations here), the same for every peer and no part of the op.
- GB/s: one read of the input and one write of the output (forward), plus one read of the gradient and one
  write of the input's gradient (forward+backward; LSQ's backward also reads the input again), over the time.
  bnbx's plain straight-through backward hands the gradient on unchanged, without that pass, so its
  forward+backward rate can exceed copy bandwidth.
- % copy: that rate over this machine's copy bandwidth (a same-sized .copy_ into an existing tensor, bytes
  read + written), measured in the same run. Every op here returns a new tensor. torch's fresh tensors fault
  in and zero new pages on first touch (the "clone" row: a new tensor, copied); bnbx's large outputs come from
  its cache of freed outputs (README, "What is in it"), so after the warm-up call they do not.
- vs built-in: torch.fake_quantize_per_channel_affine (also for per token: one scale per row) with the MinMax
  scales computed by plain torch first (the built-in takes scales; it has no dynamic mode) / bnbx time.
  LSQ rows: the same built-in with the learned scale (its gradient is the straight-through one for the weight
  only; torch's _fake_quantize_learnable_per_channel_affine is not timed).
- vs plain: a plain-torch MinMax fake quantization (amax, multiply by the reciprocal, round, clamp, multiply;
  gradient by the detach trick) / bnbx time. LSQ rows: bnbx's previous LSQ implementation (plain torch ops,
  about 10 forward and 15 backward, as an autograd.Function; LsqTorch below) / bnbx time.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch

import bnbx
from bnbx import _library
from bnbx.qat import fake_quantize, fake_quantize_lsq, lsq_init_scale

QMAX = 127
LSQ_BITS, LSQ_QMAX = 4, 7


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


class LsqTorch(torch.autograd.Function):
    """bnbx's LSQ before the fused ops: the formula in plain torch ops, fp32 math (the peer of the LSQ rows)."""

    @staticmethod
    def forward(ctx, x, scale, offset, qmin, qmax, grad_scale):
        ctx.args = (qmin, qmax, grad_scale)
        ctx.save_for_backward(x, scale, offset)
        inv = 1.0 / scale.float()
        code = torch.clamp(torch.round((x.float() - offset.float()) * inv), qmin, qmax)
        return (code * scale.float() + offset.float()).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, scale, offset = ctx.saved_tensors
        qmin, qmax, grad_scale = ctx.args
        v = (x.float() - offset.float()) * (1.0 / scale.float())
        below, above = v < qmin, v > qmax
        inside = ~(below | above)
        g = grad.float()
        d_scale = torch.where(inside, torch.round(v) - v, torch.where(below, qmin, qmax))
        grad_s = (g * d_scale).sum(1, keepdim=True) * grad_scale  # scale [rows, 1]
        grad_o = (g * (~inside)).sum().reshape(offset.shape)  # offset per tensor
        return (g * inside).to(x.dtype), grad_s.to(scale.dtype), grad_o.to(offset.dtype), None, None, None


def lsq_functions(x: torch.Tensor):
    """(bnbx, built-in, plain) LSQ fake quantization of x with its MinMax scale as the learned fp32 scale."""
    scale = lsq_init_scale(x, LSQ_BITS, "channel", "minmax").requires_grad_()
    offset = torch.zeros(())
    grad_scale = 1.0 / (x.numel() * LSQ_QMAX) ** 0.5
    zero_point = torch.zeros(x.shape[0], dtype=torch.int32)

    def ours(t):
        return fake_quantize_lsq(t, scale, bits=LSQ_BITS, grad_scale=grad_scale)

    def builtin_lsq(t):
        return torch.fake_quantize_per_channel_affine(t, scale.detach().view(-1), zero_point, 0, -LSQ_QMAX, LSQ_QMAX)

    def plain_lsq(t):
        return LsqTorch.apply(t, scale, offset, -float(LSQ_QMAX), float(LSQ_QMAX), grad_scale)

    return ours, builtin_lsq, plain_lsq, scale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="small shapes (a smoke run)")
    parser.add_argument("--case", default="", help="only the cases whose name contains this text (e.g. LSQ)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = [
        ("weight 4096x11008 per channel", (4096, 11008), "channel"),
        ("activations 2048x4096 per token", (2048, 4096), "token"),
        ("LSQ weight 4096x11008 per channel", (4096, 11008), "lsq"),
    ]
    cases = [case for case in cases if args.case in case[0]]
    if args.quick:
        cases = [(name, (shape[0] // 16, shape[1] // 16), g) for name, shape, g in cases]
    print(
        f"bnbx fake_quantize, CPU ({_library.cpu_capability()}), {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, median of {args.repeat}, "
        f"bnbx CPU output cache {bnbx.cpu_cache_stats()['limit_bytes'] >> 20} MiB"
    )
    header = (
        f"| {'case':34} | {'dtype':5} | {'pass':7} | {'bnbx ms':>8} | {'GB/s':>6} | {'% copy':>6} | "
        f"{'built-in ms':>11} | {'vs built-in':>11} | {'plain ms':>8} | {'vs plain':>8} |"
    )
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for name, shape, granularity in cases:
        for dtype in (torch.float32, torch.bfloat16):
            inputs = [torch.randn(shape, dtype=dtype) for _ in range(2)]
            nbytes = inputs[0].numel() * inputs[0].element_size()
            out = torch.empty_like(inputs[0])
            copy_ms = median_ms(out.copy_, inputs, args.repeat)
            copy_gbs = 2 * nbytes / copy_ms / 1e6
            clone_ms = median_ms(torch.clone, inputs, args.repeat)
            if granularity == "lsq":
                ours, builtin_fn, plain_fn, scale = lsq_functions(inputs[0])
                learned = [scale]
            else:
                ours = functools.partial(fake_quantize, bits=8, symmetric=True, granularity=granularity)
                builtin_fn, plain_fn = builtin, plain
                learned = []
            for pass_name in ("fwd", "fwd+bwd"):
                if pass_name == "fwd":
                    run = lambda fn: fn  # noqa: E731
                    moved = 2 * nbytes
                    grad_inputs = inputs
                else:
                    grad = torch.randn(shape, dtype=dtype)
                    grad_inputs = [t.clone().requires_grad_() for t in inputs]

                    def run(fn, grad=grad, learned=learned):
                        def step(x):
                            torch.autograd.grad(fn(x), [x, *learned], grad, allow_unused=True)

                        return step

                    moved = (5 if granularity == "lsq" else 4) * nbytes
                ms = median_ms(run(ours), grad_inputs, args.repeat)
                try:
                    builtin_ms = median_ms(run(builtin_fn), grad_inputs, max(3, args.repeat // 2))
                    builtin_text, ratio = f"{builtin_ms:11.2f}", f"{builtin_ms / ms:10.1f}x"
                except RuntimeError:
                    builtin_text, ratio = f"{'n/a':>11}", f"{'n/a':>11}"
                plain_ms = median_ms(run(plain_fn), grad_inputs, max(3, args.repeat // 2))
                gbs = moved / ms / 1e6
                print(
                    f"| {name:34} | {str(dtype)[6:]:5} | {pass_name:7} | {ms:8.2f} | {gbs:6.1f} | "
                    f"{gbs / copy_gbs * 100:5.0f}% | {builtin_text} | {ratio} | {plain_ms:8.2f} | "
                    f"{plain_ms / ms:7.1f}x |"
                )
            print(
                f"|   copy bandwidth ({str(dtype)[6:]} {shape[0]}x{shape[1]}) | | | {copy_ms:8.2f} | "
                f"{copy_gbs:6.1f} | 100% | | | | |"
            )
            print(
                f"|   clone (a new tensor) ({str(dtype)[6:]}) | | | {clone_ms:8.2f} | "
                f"{2 * nbytes / clone_ms / 1e6:6.1f} | {copy_ms / clone_ms * 100:5.0f}% | | | | |"
            )


if __name__ == "__main__":
    main()
