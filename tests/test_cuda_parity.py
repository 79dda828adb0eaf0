"""CUDA against CPU, byte for byte, through the Python API and the raw ops (skipped without a GPU; the GPU check
benchmarks/gpu_check.py runs it). Stored bytes (codes, absmax, scale, zero point) must be identical;
dequantized values identical except that any NaN matches any NaN (the NaN contract, tests/special_values.py).
Covers dtypes, every blocksize, NF4/FP4, odd sizes up to 2^20 + 3, NaN/Inf/+-0/subnormal/FLT_MAX blocks,
non-contiguous and offset views, out=, quant_storage, double quantization and int8 per tensor/channel/group.
"""

from __future__ import annotations

import copy
import zlib

import pytest
import torch
from conftest import BLOCKSIZES, CUDA_READY, DTYPES, QUANT_TYPES, dtype_id
from special_values import assert_same_bits, special_input

from bnbx import functional as F

pytestmark = pytest.mark.skipif(not CUDA_READY, reason="needs a CUDA GPU and a bnbx built with CUDA kernels")

SIZES = [1, 7, 33, 65, 4097, 2**20 + 3]


def _input(n: int, dtype: torch.dtype, blocksize: int, *key) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(repr((n, blocksize, str(dtype)) + key).encode()))
    return special_input(n, dtype, blocksize, g)


def _same_4bit(A: torch.Tensor, blocksize: int, quant_type: str, **kwargs) -> None:
    packed_c, state_c = F.quantize_4bit(A, blocksize=blocksize, quant_type=quant_type, **kwargs)
    packed_g, state_g = F.quantize_4bit(A.cuda(), blocksize=blocksize, quant_type=quant_type, **kwargs)
    assert_same_bits(packed_g, packed_c, "packed")
    assert_same_bits(state_g.absmax, state_c.absmax, "absmax")
    if state_c.state2 is not None:
        assert_same_bits(state_g.state2.absmax, state_c.state2.absmax, "nested absmax")
        assert_same_bits(state_g.offset, state_c.offset, "offset")
    assert_same_bits(F.dequantize_4bit(packed_g, state_g), F.dequantize_4bit(packed_c, state_c), "dequantized")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("n", SIZES)
def test_4bit(dtype, quant_type, blocksize, n):
    _same_4bit(_input(n, dtype, blocksize), blocksize, quant_type)


@pytest.mark.parametrize("quant_storage", [torch.uint8, torch.float16, torch.bfloat16, torch.float32, torch.int8])
@pytest.mark.parametrize("compress_statistics", [False, True])
def test_4bit_storage_and_double_quantization(quant_storage, compress_statistics):
    for n in (33, 4097, 70001):
        _same_4bit(_input(n, torch.bfloat16, 64, str(quant_storage)), 64, "nf4", quant_storage=quant_storage,
                   compress_statistics=compress_statistics)


def test_4bit_views_and_out():
    base = _input(3 * 4099, torch.float16, 64).reshape(3, 4099)
    for view in (base.t(), base[:, 1:], base.reshape(-1)[5:4102]):  # transposed, offset, odd offset
        _same_4bit(view, 64, "fp4")
    packed, state = F.quantize_4bit(base.cuda(), blocksize=64, quant_type="nf4")
    wide = torch.full((3, 4099 + 3), 7.0, device="cuda", dtype=torch.float16)
    expected = F.dequantize_4bit(packed.cpu(), state.to("cpu"))
    state.to("cuda")
    for out in (torch.empty(3, 4099, device="cuda", dtype=torch.float16), wide[:, 1:4100].contiguous()):
        F.dequantize_4bit(packed, state, out=out)
        assert_same_bits(out, expected, "out=")
    flat = torch.empty(3 * 4099 + 1, device="cuda", dtype=torch.float16)
    target = flat[1:].view(3, 4099)  # an out= at a 2-byte offset: not 16-byte aligned
    F.dequantize_4bit(packed, state, out=target)
    assert_same_bits(target, expected, "unaligned out=")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_blockwise(dtype, blocksize):
    custom = torch.sort(torch.randn(256)).values
    for n in SIZES:
        A = _input(n, dtype, blocksize, "8bit")
        for code in (None, custom) if n == 4097 else (None,):
            codes_c, state_c = F.quantize_blockwise(A, code=code, blocksize=blocksize)
            codes_g, state_g = F.quantize_blockwise(A.cuda(), code=None if code is None else code.cuda(),
                                                    blocksize=blocksize)
            assert_same_bits(codes_g, codes_c, "codes")
            assert_same_bits(state_g.absmax, state_c.absmax, "absmax")
            assert_same_bits(F.dequantize_blockwise(codes_g, state_g), F.dequantize_blockwise(codes_c, state_c),
                             "dequantized")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("granularity,shape,kwargs", [
    ("tensor", (2**20 + 3,), {}),
    ("tensor", (33,), {}),
    ("channel", (4097, 65), {"axis": 0}),
    ("channel", (65, 4097), {"axis": 1}),
    ("token", (7, 4097), {}),
    ("group", (33, 4096), {"group_size": 128}),
    ("group", (65, 96), {"group_size": 3}),
])
def test_int8(dtype, symmetric, granularity, shape, kwargs):
    n = 1
    for s in shape:
        n *= s
    A = _input(n, dtype, 4096, granularity).reshape(shape)
    q_c, s_c = F.quantize_int8(A, granularity, symmetric, **kwargs)
    q_g, s_g = F.quantize_int8(A.cuda(), granularity, symmetric, **kwargs)
    assert_same_bits(q_g, q_c, "q")
    assert_same_bits(s_g.scale, s_c.scale, "scale")
    assert_same_bits(s_g.zero_point, s_c.zero_point, "zero_point")
    for out_dtype in DTYPES:
        assert_same_bits(F.dequantize_int8(q_g, s_g, out_dtype), F.dequantize_int8(q_c, s_c, out_dtype), "out")
    # a non-contiguous input gives the same bytes as its contiguous copy
    q_t, _ = F.quantize_int8(A.cuda().t().contiguous().t(), granularity, symmetric, **kwargs)
    assert_same_bits(q_t, q_c, "non-contiguous q")


# gemm_4bit on the GPU: the GEMV (M <= 8), the tensor-core tiles (fp16/bf16, 8 < M <= 64 by default) and
# dequantize + cuBLAS (fp32, larger M), each forced over every M by BNBX_CUDA_GEMM_4BIT_TILES_MAX_M. Products
# are not bit-identical across devices (summation order), so each is held to the float64 reference within the
# error of dequantize-then-matmul in A's dtype. Shapes: partial 64-wide tiles in N and K, K % 8 != 0 (rows of W
# starting mid-byte), several row tiles, blocks spanning rows of W.
GEMM_4BIT_CASES = [
    (1, 33, 128, 64),
    (8, 7, 65, 32),
    (9, 64, 64, 64),
    (16, 65, 136, 128),
    (17, 130, 4096, 64),
    (64, 11, 200, 256),
    (65, 70, 72, 4096),
    (300, 129, 96, 64),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("tiles_max_m", [None, "0", "100000"], ids=["default", "cublas", "tiles"])
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_gemm_4bit_every_path(dtype, tiles_max_m, nested, monkeypatch):
    import bnbx
    from reference_gemm_4bit import assert_close_to_reference

    if tiles_max_m is not None:
        monkeypatch.setenv("BNBX_CUDA_GEMM_4BIT_TILES_MAX_M", tiles_max_m)
    for quant_type in QUANT_TYPES:
        for M, N, K, blocksize in GEMM_4BIT_CASES:
            g = torch.Generator().manual_seed(zlib.crc32(repr((M, N, K, blocksize, quant_type, nested)).encode()))
            W = torch.randn(N, K, generator=g)
            packed, state = F.quantize_4bit(W, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)
            A = torch.randn(M, K, generator=g).to(dtype)
            bias = torch.randn(N, generator=g).to(dtype)
            state_g = copy.deepcopy(state).to("cuda")  # QuantState.to moves in place
            ours = bnbx.matmul_4bit(A.cuda(), packed.cuda(), state_g, bias=bias.cuda())
            assert ours.device.type == "cuda"
            assert_close_to_reference(ours, A, packed, state, bias)
