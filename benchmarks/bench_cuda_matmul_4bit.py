"""bnbx.matmul_4bit on a GPU against torch's bf16 linear and bitsandbytes, and each of bnbx's CUDA paths: one table.

    python benchmarks/bench_cuda_matmul_4bit.py [--device cuda|cpu] [--k 4096] [--n 11008] [--m 1,16,...]

x bf16 [M, K] @ W^T [K, N] + bias, W NF4 with double quantization at blocksize 64. Columns: the median time of
bnbx's default path (CUDA events; `repeat` calls after a warm-up, rotating enough copies of every weight that
none sits in the L2 cache), the path it took, the tensor-core tiles and dequantize + cuBLAS forced for the same
M (BNBX_CUDA_GEMM_4BIT_TILES_MAX_M, read per call), torch bf16 F.linear, bitsandbytes' matmul_4bit (when
installed), bnbx's ratios against those two, its TFLOP/s, and the GB/s of the bytes it must move (packed
weight, statistics, x, out) with their share of this device's copy bandwidth, measured in the same run.
Issue 6's CUDA targets (K=4096, N=11008): M=1 >= 3.5x bf16, M=16 >= 3x, M=128 >= 1.5x, M=2048 within 1.1x.
The path columns show where the tiles stop paying, which sets kTilesMaxRows in csrc/cuda/gemm_4bit.cu.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

import torch

import bnbx
from bnbx import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cuda_ops import Timer  # noqa: E402

TILES_ENV = "BNBX_CUDA_GEMM_4BIT_TILES_MAX_M"
GEMV_MAX_ROWS = 8  # kGemvMaxRows in csrc/cuda/gemm_4bit.cu
TILES_MAX_ROWS = 64  # kTilesMaxRows


def default_path(M: int, device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    if M <= GEMV_MAX_ROWS:
        return "gemv"
    return "tiles" if M <= int(os.environ.get(TILES_ENV, TILES_MAX_ROWS)) else "cublas"


@contextlib.contextmanager
def tiles_limit(limit: str | None):
    """BNBX_CUDA_GEMM_4BIT_TILES_MAX_M set to `limit` (None: as it was) while timing; set outside the timed calls,
    as the op reads it per call."""
    saved = os.environ.get(TILES_ENV)
    if limit is not None:
        os.environ[TILES_ENV] = limit
    try:
        yield
    finally:
        os.environ.pop(TILES_ENV, None)
        if saved is not None:
            os.environ[TILES_ENV] = saved


def bitsandbytes_matmul(device: torch.device, weights: list[torch.Tensor]):
    """bitsandbytes' quantized copies and its matmul_4bit, or None where it is not installed or not on this device."""
    if device.type != "cuda":
        return None
    try:
        import bitsandbytes
        import bitsandbytes.functional as bnbF
    except Exception:  # noqa: BLE001 - any import failure means no bitsandbytes row
        return None
    quantized = [bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True) for w in weights]
    return bitsandbytes.matmul_4bit, quantized


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--k", type=int, default=4096)
    parser.add_argument("--n", type=int, default=11008)
    parser.add_argument("--m", default="1,8,16,32,64,128,256,2048", help="comma-separated numbers of input rows")
    parser.add_argument("--repeat", type=int, default=50)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    K, N = args.k, args.n
    dense_bytes = 2 * N * K
    # enough copies that the ones between two calls of the same copy exceed an H200's L2 (60 MB): dense weights
    # are 4x the packed ones, so the packed copies are more (the same values, in their own memory)
    copies = max(2, min(8, (256 << 20) // max(dense_bytes, 1)))
    packed_copies = max(2, min(16, (256 << 20) // max(dense_bytes // 4, 1)))
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(N, K, generator=g).to(device=device, dtype=torch.bfloat16) for _ in range(copies)]
    bias = torch.randn(N, generator=g).to(device=device, dtype=torch.bfloat16)
    rotation = [weights[i % copies] for i in range(packed_copies)]
    ours = [F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True) for w in rotation]
    peer = bitsandbytes_matmul(device, rotation)
    timer = Timer(device)

    # the copy bandwidth: a tensor the size of the dense weight copied, bytes read + written
    src = torch.empty(dense_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_gbs = 2 * dense_bytes / timer.median_ms([lambda: dst.copy_(src)], args.repeat) / 1e6
    packed_bytes = ours[0][0].numel() + ours[0][1].absmax.numel() + 4 * ours[0][1].state2.absmax.numel()

    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(
        f"device: {name}; bnbx {bnbx.__version__}, torch {torch.__version__}; x bf16 [M, {K}] @ W^T [{K}, {N}] + b; "
        f"NF4 + double quant, blocksize 64; rotating {copies} bf16 and {packed_copies} 4-bit weight copies; "
        f"median of {args.repeat}; "
        f"copy bandwidth {copy_gbs:.0f} GB/s; peer bitsandbytes: {'yes' if peer else 'not available'}"
    )
    columns = ["   M", "bnbx ms", "path  ", "tiles ms", "cublas ms", "bf16 ms", "  bnb ms", "vs bf16", "vs bnb"]
    header = "| " + " | ".join(columns + ["TFLOP/s", " GB/s", "% copy"]) + " |"
    print(header)
    print("|" + "|".join("-" * (len(cell)) for cell in header.split("|")[1:-1]) + "|")
    for M in (int(m) for m in args.m.split(",")):
        x = torch.randn(M, K, generator=g).to(device=device, dtype=torch.bfloat16)
        calls = [lambda i=i: bnbx.matmul_4bit(x, ours[i][0], ours[i][1], bias=bias) for i in range(packed_copies)]
        ms = timer.median_ms(calls, args.repeat)
        forced = {}
        if device.type == "cuda" and M > GEMV_MAX_ROWS:
            for path, limit in (("tiles", str(1 << 20)), ("cublas", "0")):
                with tiles_limit(limit):
                    forced[path] = timer.median_ms(calls, args.repeat)
        dense = [lambda i=i: torch.nn.functional.linear(x, weights[i], bias) for i in range(copies)]
        dense_ms = timer.median_ms(dense, args.repeat)
        bnb_ms = None
        if peer is not None:
            matmul, quantized = peer
            bnb = [lambda i=i: matmul(x, quantized[i][0].t(), quantized[i][1], bias=bias) for i in range(packed_copies)]
            bnb_ms = timer.median_ms(bnb, args.repeat)
        moved = packed_bytes + 2 * M * K + 2 * M * N + 2 * N
        gbs = moved / ms / 1e6

        def cell(v, width, digits=4):
            return f"{v:{width}.{digits}f}" if v is not None else "-".rjust(width)

        print(
            f"| {M:4d} | {ms:7.4f} | {default_path(M, device):6s} | {cell(forced.get('tiles'), 8)} | "
            f"{cell(forced.get('cublas'), 9)} | {dense_ms:7.4f} | {cell(bnb_ms, 8)} | {dense_ms / ms:6.2f}x | "
            f"{(f'{bnb_ms / ms:5.2f}x' if bnb_ms else '-'.rjust(6))} | {2 * M * N * K / ms / 1e9:7.2f} | "
            f"{gbs:5.0f} | {100 * gbs / copy_gbs:5.0f}% |"
        )


if __name__ == "__main__":
    main()
