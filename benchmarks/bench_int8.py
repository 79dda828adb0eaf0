"""LLM.int8() linear layers on the CPU: bnbx against plain torch, torch._int_mm and bitsandbytes, one table.

    python benchmarks/bench_int8.py [--ms 1,16,128,2048] [--k 4096] [--n 11008] [--threads 2] [--repeat 5]

Rows per M (activations [M, K], weight [N, K]):
- torch fp32 / bf16 / fp16: ``F.linear`` with a weight of that dtype (bf16/fp16 inputs for bf16/fp16).
- torch._int_mm: the int8 x int8 -> int32 product alone (oneDNN), no quantization or scaling.
- bitsandbytes Linear8bitLt (eval mode: its LLM.int8() path; training mode on the CPU skips it), threshold 0
  and threshold 6, fp16 input (it casts to fp16 anyway).
- bnbx Linear8bitLt, threshold 0 and threshold 6, bf16 input; the threshold-6 input holds 8 outlier columns
  (|x| 20..60), as does bitsandbytes'. At M >= 32 also threshold 0 with ``prepack_weight = True`` (the weight
  kept in the AMX tile layout, N x K more bytes).
- bnbx ops alone: int8_vectorwise_quant (threshold 6), int8_linear_matmul, int8_mm_dequant.
Columns: median ms over --repeat calls after a warm-up; TFLOP/s = 2 M N K / time; GB/s = weight bytes / time
(the weight dominates traffic at small M); % copy = GB/s over this machine's copy bandwidth measured in the same
run (bytes read + written by a large .copy_); vs bf16 = torch bf16 time / this time (> 1: faster); vs bnb =
bitsandbytes' time at the same threshold / this time. At M <= 128 every weight is rotated through enough copies
(--rotate-mb, 640 MB by default) that none is served from this CPU's large L3; every copy is called once
before timing (bnbx Linear8bitLt keeps its weight in the AMX layout after its first call with >= 32 rows).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from typing import Callable, Optional

import torch

import bnbx
from bnbx import _library
from bnbx.functional_int8 import int8_gemm_route
from bnbx.nn import Linear8bitLt

ROTATE_BYTES = 640 * 2**20


def median_ms(fn: Callable[[int], object], repeat: int) -> float:
    fn(0)
    times = []
    for i in range(repeat):
        start = time.perf_counter()
        fn(i + 1)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def copies_for(nbytes: int, M: int) -> int:
    return 1 if M > 128 else max(1, -(-ROTATE_BYTES // nbytes))


def set_rotate_mb(mb: int) -> None:
    global ROTATE_BYTES
    ROTATE_BYTES = mb * 2**20


def copy_bandwidth() -> float:
    src = torch.empty(256 * 2**20, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    ms = median_ms(lambda i: dst.copy_(src), 5)
    return 2 * src.numel() / ms / 1e6


def outlier_input(M: int, K: int, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    x = torch.randn(M, K, generator=generator)
    cols = torch.randperm(K, generator=generator)[:8]
    x[:, cols] = (torch.rand(M, 8, generator=generator) * 40 + 20) * torch.sign(torch.randn(M, 8, generator=generator))
    return x.to(dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ms", default="1,16,128,2048")
    parser.add_argument("--k", type=int, default=4096)
    parser.add_argument("--n", type=int, default=11008)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--rotate-mb", type=int, default=640, help="weight bytes to rotate through at M <= 128")
    args = parser.parse_args()
    set_rotate_mb(args.rotate_mb)
    torch.set_num_threads(args.threads)
    K, N = args.k, args.n
    try:
        import bitsandbytes as bnb
    except ImportError:
        bnb = None

    g = torch.Generator().manual_seed(0)
    W = torch.randn(N, K, generator=g) / K**0.5
    bw = copy_bandwidth()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(
        f"# bench_int8: K={K} N={N} threads={args.threads} | {cpu} | bnbx ISA {_library.cpu_capability()} "
        f"+ {','.join(_library.cpu_extensions()) or 'none'}; int8 GEMM route (M >= 32): {int8_gemm_route()}, "
        f"M < 32: {'avx512_vnni' if 'avx512_vnni' in _library.cpu_extensions() else int8_gemm_route()}"
    )
    print(
        f"# torch {torch.__version__}, bitsandbytes {bnb.__version__ if bnb else 'not installed'}, "
        f"copy bandwidth {bw:.1f} GB/s, load average {os.getloadavg()[0]:.1f} (on {os.cpu_count()} CPUs)"
    )
    print("| M | implementation | ms | TFLOP/s | GB/s | % copy | vs bf16 | vs bnb |")
    print("|---|---|---|---|---|---|---|---|")

    for M in [int(m) for m in args.ms.split(",")]:
        repeat = args.repeat
        rows: list[tuple[str, float, int, Optional[str]]] = []  # name, ms, weight bytes, bnb peer key
        times: dict[str, float] = {}

        def run(name: str, make: Callable[[], list], call: Callable[[object], object], wbytes: int, peer=None):
            objs = make()
            with torch.inference_mode():
                for obj in objs[1:]:  # steady state for every copy (Linear8bitLt packs its weight once, M >= 32)
                    call(obj)
                ms = median_ms(lambda i: call(objs[i % len(objs)]), repeat)
            times[name] = ms
            rows.append((name, ms, wbytes, peer))

        x32 = torch.randn(M, K, generator=g)
        xb, xh = x32.bfloat16(), x32.half()
        xo_b, xo_h = outlier_input(M, K, torch.bfloat16, g), outlier_input(M, K, torch.float16, g)

        for name, dtype, x in (
            ("torch fp32 linear", torch.float32, x32),
            ("torch bf16 linear", torch.bfloat16, xb),
            ("torch fp16 linear", torch.float16, xh),
        ):
            wb = N * K * dtype.itemsize
            run(
                name,
                lambda: [W.to(dtype).clone() for _ in range(copies_for(wb, M))],
                lambda w, x=x: torch.nn.functional.linear(x, w),
                wb,
            )
        CB, SCB, _ = bnbx.int8_vectorwise_quant(W)
        xq, xs, _ = bnbx.int8_vectorwise_quant(xb)
        run(
            "torch._int_mm (product only)",
            lambda: [CB.clone() for _ in range(copies_for(N * K, M))],
            lambda w: torch._int_mm(xq, w.t()),
            N * K,
        )
        linear = torch.nn.Linear(K, N, bias=True)
        linear.weight.data = W.clone()
        if bnb is not None:
            for thr, x in ((0.0, xh), (6.0, xo_h)):

                def make_bnb(thr=thr):
                    mods = []
                    for _ in range(copies_for(N * K, M)):
                        m = bnb.nn.Linear8bitLt(K, N, has_fp16_weights=False, threshold=thr)
                        m.load_state_dict(linear.state_dict())
                        mods.append(m.to("cpu").eval())
                    return mods

                run(f"bitsandbytes Linear8bitLt thr {thr:g}", make_bnb, lambda m, x=x: m(x), N * K)
        for thr, x in ((0.0, xb), (6.0, xo_b)):

            def make_ours(thr=thr):
                return [Linear8bitLt.from_linear(linear, threshold=thr).eval() for _ in range(copies_for(N * K, M))]

            run(
                f"bnbx Linear8bitLt thr {thr:g}",
                make_ours,
                lambda m, x=x: m(x),
                N * K,
                f"bitsandbytes Linear8bitLt thr {thr:g}",
            )
        if M >= 32:

            def make_prepacked():
                mods = [Linear8bitLt.from_linear(linear).eval() for _ in range(copies_for(N * K, M))]
                for m in mods:
                    m.prepack_weight = True
                return mods

            run(
                "bnbx Linear8bitLt thr 0, prepack_weight",
                make_prepacked,
                lambda m: m(xb),
                N * K,
                "bitsandbytes Linear8bitLt thr 0",
            )
        run("bnbx int8_vectorwise_quant (op)", lambda: [xo_b], lambda x: bnbx.int8_vectorwise_quant(x, 6.0), 0)
        run(
            "bnbx int8_linear_matmul (op)",
            lambda: [CB.clone() for _ in range(copies_for(N * K, M))],
            lambda w: bnbx.int8_linear_matmul(xq, w),
            N * K,
        )
        C = bnbx.int8_linear_matmul(xq, CB)
        run(
            "bnbx int8_mm_dequant (op)",
            lambda: [C],
            lambda c: bnbx.int8_mm_dequant(c, xs, SCB, dtype=torch.bfloat16),
            0,
        )

        bf16 = times["torch bf16 linear"]
        for name, ms, wbytes, peer in rows:
            tflops = 2 * M * N * K / ms / 1e9 if "quant" not in name and "dequant" not in name else float("nan")
            gbs = wbytes / ms / 1e6
            gb = f"{gbs:.1f}" if wbytes else "-"
            pct = f"{100 * gbs / bw:.0f}%" if wbytes else "-"
            tf = f"{tflops:.2f}" if tflops == tflops else "-"
            vs_bnb = f"{times[peer] / ms:.2f}x" if peer and peer in times else "-"
            print(f"| {M} | {name} | {ms:.2f} | {tf} | {gb} | {pct} | {bf16 / ms:.2f}x | {vs_bnb} |", flush=True)


if __name__ == "__main__":
    main()
