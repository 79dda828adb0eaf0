"""Every bnbx op on one weight, raw op and Python wrapper, against a plain copy of the same bytes: one table.

    python benchmarks/bench_cuda_ops.py [--device cuda|cpu] [--shape 11008x4096] [--repeat 50]

Columns: median time (CUDA events on a GPU, perf_counter on the CPU) over `repeat` calls after a warm-up,
rotating enough copies of the input that none sits in the L2 cache; GB/s = bytes the op must read and write
(input + stored output) / time; % copy = that over the copy bandwidth of this device measured in the same run
(a tensor of the weight's size .copy_'d, bytes read + written). Quantize rows allocate their outputs, as the
ops do; dequantize rows write into a preallocated out= where the op has one. Targets of issue 11 on an
H100/H200 for 11008x4096 bf16 at blocksize 64: dequantize >= 90%, quantize >= 80%, int8 >= 80% of copy.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from bnbx import functional as F

BLOCKSIZE = 64


class Timer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def median_ms(self, fns: list[Callable[[], object]], repeat: int) -> float:
        for fn in fns:
            fn()  # warm up every copy
        times = []
        for i in range(repeat):
            fn = fns[i % len(fns)]
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


def rows(device: torch.device, shape: tuple[int, int], copies: int):
    """(name, fns, bytes moved) per row; fns rotate over `copies` inputs."""
    n = shape[0] * shape[1]
    W = [torch.randn(shape, device=device, dtype=torch.bfloat16) for _ in range(copies)]
    q4 = [F.quantize_4bit(w, blocksize=BLOCKSIZE, quant_type="nf4") for w in W]
    q4n = [F.quantize_4bit(w, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=True) for w in W]
    q8 = [F.quantize_blockwise(w, blocksize=256) for w in W]
    qi = {
        g: [F.quantize_int8(w, g, **kw) for w in W]
        for g, kw in [("tensor", {}), ("channel", {"axis": 0}), ("group", {"group_size": 128})]
    }
    outs = [torch.empty_like(w) for w in W]
    code = F._table("dynamic", device)
    blocks = -(-n // BLOCKSIZE)
    b16, b4 = 2 * n, n // 2
    r = range(copies)
    yield "copy (bf16 .copy_)", [lambda i=i: outs[i].copy_(W[i]) for i in r], 2 * b16
    yield (
        "op quantize_4bit nf4",
        [lambda i=i: torch.ops.bnbx.quantize_4bit(W[i], BLOCKSIZE, "nf4", torch.uint8) for i in r],
        b16 + b4 + 4 * blocks,
    )
    yield (
        "op quantize_4bit fp4",
        [lambda i=i: torch.ops.bnbx.quantize_4bit(W[i], BLOCKSIZE, "fp4", torch.uint8) for i in r],
        b16 + b4 + 4 * blocks,
    )
    yield (
        "F.quantize_4bit nf4",
        [lambda i=i: F.quantize_4bit(W[i], blocksize=BLOCKSIZE, quant_type="nf4") for i in r],
        b16 + b4 + 4 * blocks,
    )
    yield (
        "F.quantize_4bit nf4 nested",
        [lambda i=i: F.quantize_4bit(W[i], blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=True) for i in r],
        b16 + b4 + blocks,
    )
    yield (
        "op dequantize_4bit.out",
        [
            lambda i=i: torch.ops.bnbx.dequantize_4bit.out(
                q4[i][0], q4[i][1].absmax, BLOCKSIZE, "nf4", list(shape), torch.bfloat16, out=outs[i]
            )
            for i in r
        ],
        b16 + b4 + 4 * blocks,
    )
    yield (
        "op dequantize_4bit (new out)",
        [
            lambda i=i: torch.ops.bnbx.dequantize_4bit(
                q4[i][0], q4[i][1].absmax, BLOCKSIZE, "nf4", list(shape), torch.bfloat16
            )
            for i in r
        ],
        b16 + b4 + 4 * blocks,
    )
    yield (
        "F.dequantize_4bit out=",
        [lambda i=i: F.dequantize_4bit(q4[i][0], q4[i][1], out=outs[i]) for i in r],
        b16 + b4 + 4 * blocks,
    )
    yield (
        "F.dequantize_4bit nested out=",
        [lambda i=i: F.dequantize_4bit(q4n[i][0], q4n[i][1], out=outs[i]) for i in r],
        b16 + b4 + blocks,
    )
    yield (
        "op quantize_blockwise (256)",
        [lambda i=i: torch.ops.bnbx.quantize_blockwise(W[i], code, 256) for i in r],
        b16 + n + 4 * (n // 256),
    )
    yield (
        "op dequantize_blockwise",
        [
            lambda i=i: torch.ops.bnbx.dequantize_blockwise(q8[i][0], q8[i][1].absmax, code, 256, torch.bfloat16)
            for i in r
        ],
        b16 + n + 4 * (n // 256),
    )
    for g, kw in [("tensor", {}), ("channel", {"axis": 0}), ("group", {"group_size": 128})]:
        yield f"F.quantize_int8 {g}", [lambda i=i, g=g, kw=kw: F.quantize_int8(W[i], g, **kw) for i in r], b16 + n
        yield (
            f"F.dequantize_int8 {g}",
            [lambda i=i, g=g: F.dequantize_int8(qi[g][i][0], qi[g][i][1]) for i in r],
            b16 + n,
        )
    yield (
        "op quantize_int8 (group 128, asym)",
        [lambda i=i: torch.ops.bnbx.quantize_int8(W[i], 128, False) for i in r],
        b16 + n + 8 * (n // 128),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--shape", default="11008x4096")
    parser.add_argument("--repeat", type=int, default=50)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    shape = tuple(int(s) for s in args.shape.split("x"))
    # enough copies to exceed the L2 cache (60 MB on an H200) several times over
    weight_bytes = 2 * shape[0] * shape[1]
    copies = max(2, min(8, (256 << 20) // max(weight_bytes, 1)))
    timer = Timer(device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(
        f"device: {name}; weight {args.shape} bf16, blocksize {BLOCKSIZE}; {copies} rotating copies; "
        f"median of {args.repeat}"
    )
    table, copy_gbs = [], None
    for row, fns, moved in rows(device, shape, copies):
        ms = timer.median_ms(fns, args.repeat)
        gbs = moved / ms / 1e6
        copy_gbs = gbs if copy_gbs is None else copy_gbs
        table.append((row, ms, gbs, 100 * gbs / copy_gbs))
    width = max(len(r[0]) for r in table)
    print(f"| {'op'.ljust(width)} |       ms |     GB/s | % copy |")
    print(f"|{'-' * (width + 2)}|---------:|---------:|-------:|")
    for row, ms, gbs, share in table:
        print(f"| {row.ljust(width)} | {ms:8.4f} | {gbs:8.1f} | {share:5.0f}% |")


if __name__ == "__main__":
    main()
