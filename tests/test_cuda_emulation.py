"""The CUDA kernels (csrc/cuda/*.cu) run on the CPU through the host emulation (tests/cuda_emulation.py), bit for
bit against the CPU kernels, which tests/test_quantize_*.py check against the plain-torch reference. This is
how every CUDA kernel is tested on every change where no GPU is lent; benchmarks/gpu_check.py repeats the
comparisons on a real GPU. The emulated GPU has 3 SMs, so the larger sizes run several tiles per thread block.
"""

from __future__ import annotations

import os
import zlib

import pytest
import torch
from conftest import BLOCKSIZES, DTYPES, QUANT_TYPES, dtype_id
from cuda_emulation import compiler, load
from special_values import assert_same_bits, special_input

from bnbx.functional import create_dynamic_map

pytestmark = pytest.mark.skipif(compiler() is None, reason="the CUDA emulation needs g++")

# 1, 7, 33, 65: partial vectors and blocks; 4097: one past a 4096 block; 70001: several waves of blocks.
SIZES = [1, 7, 33, 65, 4097]
LARGE = 70001
QUICK = os.environ.get("BNBX_EMU_QUICK") == "1"  # make sanitize: small sizes only


@pytest.fixture(scope="module")
def emu():
    return load()


def _gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_4bit_matches_cpu(emu, dtype, quant_type, blocksize):
    sizes = SIZES + ([LARGE] if blocksize in (32, 64, 4096) and not QUICK else [])
    for n in sizes:
        A = special_input(n, dtype, blocksize, _gen(n, blocksize, quant_type, str(dtype)))
        packed, absmax = emu.quantize_4bit(A, blocksize, quant_type)
        cpu_packed, cpu_absmax = torch.ops.bnbx.quantize_4bit(A, blocksize, quant_type, torch.uint8)
        assert_same_bits(packed, cpu_packed.reshape(-1), f"packed n={n}")
        assert_same_bits(absmax, cpu_absmax, f"absmax n={n}")
        out = emu.dequantize_4bit(packed, absmax, n, blocksize, quant_type, dtype)
        cpu_out = torch.ops.bnbx.dequantize_4bit(cpu_packed, cpu_absmax, blocksize, quant_type, [n], dtype)
        assert_same_bits(out, cpu_out, f"dequantized n={n}")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_blockwise_matches_cpu(emu, dtype, blocksize):
    code = create_dynamic_map(signed=True)
    custom = torch.sort(torch.randn(256, generator=_gen("code", blocksize))).values  # any sorted code
    sizes = SIZES + ([LARGE] if blocksize in (64, 256) and not QUICK else [])
    for n in sizes:
        A = special_input(n, dtype, blocksize, _gen(n, blocksize, str(dtype)))
        for c in (code, custom) if n == 4097 else (code,):
            codes, absmax = emu.quantize_blockwise(A, c, blocksize)
            cpu_codes, cpu_absmax = torch.ops.bnbx.quantize_blockwise(A, c, blocksize)
            assert_same_bits(codes, cpu_codes, f"codes n={n}")
            assert_same_bits(absmax, cpu_absmax, f"absmax n={n}")
            out = emu.dequantize_blockwise(codes, absmax, c, blocksize, dtype)
            cpu_out = torch.ops.bnbx.dequantize_blockwise(cpu_codes, cpu_absmax, c, blocksize, dtype)
            assert_same_bits(out, cpu_out, f"dequantized n={n}")


# Group sizes: 1 and odd ones (groups start at any element), vector multiples, a channel of a 4097-wide
# row, and per tensor (group_size >= n). A per-tensor group over LARGE elements takes the split path.
INT8_GROUPS = [1, 3, 7, 8, 32, 100, 128, 4097, 1 << 40]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("group_size", INT8_GROUPS)
def test_int8_matches_cpu(emu, dtype, symmetric, group_size):
    # under QUICK, one size that still takes the split (per-tensor) path
    sizes = SIZES + ([LARGE] if group_size in (7, 128, 1 << 40) and not QUICK else [])
    sizes += [40001] if QUICK and group_size == 1 << 40 else []
    for n in sizes:
        A = special_input(n, dtype, min(group_size, 4096), _gen(n, group_size, symmetric, str(dtype)))
        q, scale, zero_point = emu.quantize_int8(A, group_size, symmetric)
        cpu_q, cpu_scale, cpu_zero_point = torch.ops.bnbx.quantize_int8(A, group_size, symmetric)
        assert_same_bits(q, cpu_q.reshape(-1), f"q n={n}")
        assert_same_bits(scale, cpu_scale, f"scale n={n}")
        assert_same_bits(zero_point, cpu_zero_point, f"zero_point n={n}")
        for out_dtype in DTYPES:
            out = emu.dequantize_int8(q, scale, zero_point, group_size, out_dtype)
            cpu_out = torch.ops.bnbx.dequantize_int8(cpu_q, cpu_scale, cpu_zero_point, group_size, out_dtype)
            assert_same_bits(out, cpu_out.reshape(-1), f"dequantized n={n} to {out_dtype}")


def test_int8_dequantize_saturates_fp16(emu):
    # zero-point rounding can rebuild past 65504; the kernels clamp fp16 output to its finite range
    q = torch.tensor([127, -128, 0, 5], dtype=torch.int8)
    scale = torch.tensor([600.0])
    zero_point = torch.tensor([-20], dtype=torch.int32)
    out = emu.dequantize_int8(q, scale, zero_point, 4, torch.float16)
    assert_same_bits(out, torch.ops.bnbx.dequantize_int8(q, scale, zero_point, 4, torch.float16))
    assert out[0].item() == 65504.0


def test_emulator_reports_divergent_barriers(emu):
    # The emulator's own checks: kernels that break CUDA's rules must fail, not pass silently.
    lib = emu.lib
    assert lib.bnbx_emu_selftest(0) == 0, lib.bnbx_emu_error().decode()  # a correct reduction works
    assert lib.bnbx_emu_selftest(1) == 1 and b"__syncthreads" in lib.bnbx_emu_error()
    assert lib.bnbx_emu_selftest(2) == 1 and b"shuffle" in lib.bnbx_emu_error()
    assert lib.bnbx_emu_selftest(3) == 1 and b"shuffle" in lib.bnbx_emu_error()
