"""Small calls of every CUDA kernel, for compute-sanitizer (memcheck, racecheck, synccheck) in gpu_check.py.

    python benchmarks/gpu_sanitize_cases.py [--device cuda|cpu]

Covers each kernel's paths: partial vectors and blocks (n = 1, 33, 4097), one quantization block per 1024
threads (blocksize 4096 with fp32), NaN/Inf/zero/subnormal blocks, every dtype, int8 whole and split groups
(a per-tensor group of 70001 elements is split across thread blocks), unaligned views (copied first), out=.
gemm_4bit's three CUDA paths (GEMV, tensor-core tiles, dequantize + cuBLAS) on small shapes.
Exits non-zero if a result differs from the CPU kernels, so a run under the sanitizer also checks values.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference_gemm_4bit import assert_close_to_reference
from special_values import assert_same_bits, special_input

import bnbx
from bnbx import functional as F


def gemm_4bit_cases(device: str, g: torch.Generator) -> int:
    """gemm_4bit's paths on small shapes: the GEMV (M = 1), the tensor-core tiles (16 and 64-row tiles, two
    row tiles, shared-memory staging that racecheck watches) and dequantize + cuBLAS (M = 130 above the tiles'
    limit set here), K % 8 == 0 and not, K long enough to be split, with double quantization. Held to the float64
    reference."""
    os.environ["BNBX_CUDA_GEMM_4BIT_TILES_MAX_M"] = "128"
    calls = 0
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for N, K in ((70, 136), (9, 65), (70, 1024)):  # K = 1024: the tiles split K (few tiles, a whole GPU)
            W = torch.randn(N, K, generator=g)
            packed, state = F.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True)
            state_d = copy.deepcopy(state).to(device)
            bias = torch.randn(N, generator=g).to(dtype)
            for M in (1, 9, 17, 65, 130):
                A = torch.randn(M, K, generator=g).to(dtype)
                ours = bnbx.matmul_4bit(A.to(device), packed.to(device), state_d, bias=bias.to(device))
                assert_close_to_reference(ours, A, packed, state, bias)
                calls += 1
    return calls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    device = parser.parse_args(argv).device
    g = torch.Generator().manual_seed(0)
    calls = 0
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for n, blocksize in ((1, 64), (33, 32), (4097, 64), (4097, 4096), (20000, 128)):
            A = special_input(n, dtype, blocksize, g)
            for quant_type in ("nf4", "fp4"):
                p_ref, s_ref = F.quantize_4bit(
                    A, blocksize=blocksize, quant_type=quant_type, compress_statistics=n > 4000
                )
                p, s = F.quantize_4bit(
                    A.to(device), blocksize=blocksize, quant_type=quant_type, compress_statistics=n > 4000
                )
                assert_same_bits(p, p_ref, "4-bit packed")
                out = torch.empty(n, device=device, dtype=dtype)
                assert_same_bits(F.dequantize_4bit(p, s, out=out), F.dequantize_4bit(p_ref, s_ref), "4-bit out")
                calls += 4
            c_ref, b_ref = F.quantize_blockwise(A, blocksize=blocksize)
            c, b = F.quantize_blockwise(A.to(device), blocksize=blocksize)
            assert_same_bits(c, c_ref, "8-bit codes")
            assert_same_bits(F.dequantize_blockwise(c, b), F.dequantize_blockwise(c_ref, b_ref), "8-bit values")
            calls += 2
        full = special_input(4099, dtype, 64, g)
        p_ref, _ = F.quantize_4bit(full[3:], blocksize=64, quant_type="nf4")
        unaligned = full.to(device)[3:]  # a view whose data is not 16-byte aligned
        assert_same_bits(F.quantize_4bit(unaligned, blocksize=64, quant_type="nf4")[0], p_ref, "unaligned view")
        for n, kwargs in ((70001, {}), (4097, {"granularity": "group", "group_size": 17}), (33, {})):
            A = special_input(n, dtype, 4096, g)
            for symmetric in (True, False):
                q_ref, s_ref = F.quantize_int8(A, symmetric=symmetric, **kwargs)
                q, s = F.quantize_int8(A.to(device), symmetric=symmetric, **kwargs)
                assert_same_bits(q, q_ref, "int8 q")
                assert_same_bits(F.dequantize_int8(q, s), F.dequantize_int8(q_ref, s_ref), "int8 values")
                calls += 2
    calls += gemm_4bit_cases(device, g)
    if device == "cuda":
        torch.cuda.synchronize()
    print(f"{calls} kernel calls on {device}, all equal to the CPU kernels (gemm_4bit: within its bound)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
