"""Linear4bit forward on the CPU: bnbx against torch's bf16 linear and bitsandbytes' Linear4bit, one table.

    python benchmarks/bench_linear4bit.py [--k 4096] [--n 11008] [--m 1,16,128,2048] [--threads 2] [--repeat 20]

All three compute ``x @ W^T + b`` for bf16 ``x [M, K]`` and ``W [N, K]``: bnbx ``Linear4bit`` (NF4, double
quantization, compute_dtype bf16), ``torch.nn.functional.linear`` with the bf16 weight, and bitsandbytes'
``Linear4bit`` with the same settings (eval mode, no gradient: its fastest CPU path). Columns:
- ms: median wall time (time.perf_counter; --clock cpu: CPU time of all threads) after a warm-up, rotating several
  copies of each layer so that the
  weight is not still in a cache (bnbx and bitsandbytes: 4 copies of 23 MB, the same bytes for the two 4-bit
  layers; torch: 2 of 90 MB).
- vs torch, vs bnb: how many times faster bnbx is (their ms / bnbx ms), measured in the same run.
- GB/s: bnbx's packed weight bytes (codes + statistics as stored) / time; % copy: that over this machine's
  copy bandwidth (a 90 MB bf16 tensor's .copy_, bytes read + written), measured in the same run.
- TFLOP/s: 2 M N K / bnbx time.
The header prints the CPU's instruction sets, threads, the copy bandwidth, and the memory per parameter of
the weight in each format. Slow baselines are repeated fewer times (at least 3, about 3 s per cell).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import warnings
from typing import Callable, Optional

import torch
from torch import nn

import bnbx
from bnbx import _library
from bnbx.nn import Linear4bit

BUDGET_S = 3.0
ISA_FLAGS = ["avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
             "amx_tile", "amx_bf16", "amx_int8"]  # fmt: skip


CLOCK = time.perf_counter  # --clock cpu: time.process_time (CPU seconds of all threads of this process)


def median_ms(fns: list[Callable[[], object]], repeat: int, budget_s: Optional[float] = None) -> float:
    """Median over `repeat` calls rotating over `fns` after one warm-up per fn; with a budget, fewer calls (>= 3)."""
    for fn in fns:
        fn()
    begin = CLOCK()
    fns[0]()
    first = CLOCK() - begin
    if budget_s is not None:
        repeat = max(3, min(repeat, int(budget_s / max(first, 1e-9))))
    times = [first]
    for i in range(repeat - 1):
        begin = CLOCK()
        fns[(i + 1) % len(fns)]()
        times.append(CLOCK() - begin)
    return statistics.median(times) * 1e3


def copy_bandwidth_gbs(elements: int, repeat: int) -> float:
    sources = [torch.randn(elements).to(torch.bfloat16) for _ in range(2)]
    targets = [torch.empty_like(s).zero_() for s in sources]
    ms = median_ms([lambda s=s, t=t: t.copy_(s) for s, t in zip(sources, targets)], max(repeat, 10))
    return 2 * elements * 2 / (ms * 1e6)


def cpu_description() -> tuple[str, list[str]]:
    name, flags = platform.processor() or platform.machine(), []
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    present = set(line.split(":", 1)[1].split())
                    flags = [f for f in ISA_FLAGS if f in present]
                    break
    except OSError:
        pass
    return name, flags


def weight_bytes(layer: Linear4bit) -> int:
    state = layer.weight.quant_state
    tensors = [layer.weight.data, state.absmax]
    if state.state2 is not None:
        tensors += [state.state2.absmax, state.offset]
    return sum(t.numel() * t.element_size() for t in tensors)


def load_bitsandbytes():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import bitsandbytes
    except Exception:  # not installed, or its native library fails to load
        return None
    return bitsandbytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--k", type=int, default=4096)
    parser.add_argument("--n", type=int, default=11008)
    parser.add_argument("--m", default="1,16,128,2048", help="comma-separated numbers of input rows")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--repeat", type=int, default=20, help="timed calls per bnbx cell (median reported)")
    parser.add_argument("--no-bnb", action="store_true", help="skip bitsandbytes")
    parser.add_argument(
        "--clock",
        default="wall",
        choices=["wall", "cpu"],
        help="cpu: CPU time of all threads (time.process_time), steadier than wall time on a machine "
        "others load; GB/s and %% copy then describe CPU-seconds, not elapsed time",
    )
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    K, N = args.k, args.n
    dense = nn.Linear(K, N).to(torch.bfloat16)
    with torch.no_grad():
        dense.weight.normal_(0, 0.02)
    ours = [Linear4bit.from_linear(dense, compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True)
            for _ in range(4)]  # fmt: skip
    torch_layers = [dense, nn.Linear(K, N).to(torch.bfloat16)]
    bnb = None if args.no_bnb else load_bitsandbytes()
    theirs = []
    if bnb is not None:
        for _ in range(4):
            layer = bnb.nn.Linear4bit(K, N, compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4")
            layer.load_state_dict(dense.state_dict())
            theirs.append(layer.to("cpu").eval())

    copy_gbs = copy_bandwidth_gbs(N * K, args.repeat)
    packed_bytes = weight_bytes(ours[0])
    rows = []
    with torch.inference_mode():
        for M in [int(m) for m in args.m.split(",")]:
            xs = [torch.randn(M, K, dtype=torch.bfloat16) for _ in range(4)]
            slow = M * N * K > 2e10  # big products: fewer repeats
            ms_ours = median_ms([lambda i=i: ours[i](xs[i]) for i in range(4)], args.repeat, BUDGET_S if slow else None)
            copy_gbs = max(copy_gbs, copy_bandwidth_gbs(N * K, args.repeat)) if M == 1 else copy_gbs
            ms_torch = median_ms([lambda i=i: torch_layers[i](xs[i]) for i in range(2)], args.repeat, BUDGET_S)
            ms_bnb = None
            if theirs:
                ms_bnb = median_ms([lambda i=i: theirs[i](xs[i]) for i in range(4)], args.repeat, BUDGET_S)
            gbs = packed_bytes / (ms_ours * 1e6)
            rows.append([
                str(M), f"{ms_ours:.3f}", f"{ms_torch:.3f}", "n/a" if ms_bnb is None else f"{ms_bnb:.3f}",
                f"{ms_torch / ms_ours:.2f}x", "n/a" if ms_bnb is None else f"{ms_bnb / ms_ours:.2f}x",
                f"{gbs:.1f}", f"{100 * gbs / copy_gbs:.0f}%", f"{2 * M * N * K / (ms_ours * 1e9):.2f}",
            ])  # fmt: skip

    name, flags = cpu_description()
    params = N * K
    nf4_plain = (params // 2 + 4 * -(-params // 64)) / params
    print(
        f"bnbx {bnbx.__version__}, torch {torch.__version__}, bitsandbytes {bnb.__version__ if bnb else 'n/a'}; "
        f"x bf16 [M, {K}] @ W^T [{K}, {N}] + b; NF4 + double quantization, blocksize 64, compute bf16; "
        f"clock {args.clock}"
    )
    print(
        f"cpu: {name}; {torch.get_num_threads()} threads; ISA: {' '.join(flags) or 'unknown'}; "
        f"bnbx kernels {_library.cpu_capability()}; copy bandwidth {copy_gbs:.1f} GB/s"
    )
    print(
        f"weight bytes per parameter: fp32 4, bf16 2, NF4 {nf4_plain:.4f}, NF4 + double quant "
        f"{packed_bytes / params:.4f}"
    )
    header = ["M", "bnbx ms", "torch bf16 ms", "bnb ms", "vs torch", "vs bnb", "GB/s", "% copy", "TFLOP/s"]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))


if __name__ == "__main__":
    main()
