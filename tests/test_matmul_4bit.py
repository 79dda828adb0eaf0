"""bnbx.matmul_4bit / torch.ops.bnbx.gemm_4bit against the plain-torch reference (tests/reference_gemm_4bit.py).

The fused kernels (4-bit GEMV for few rows, dequantized tiles into a 16-bit GEMM for many) never compute the
dense weight; they must be as close to the float64 product as dequantize-then-matmul in the input's dtype is.
"""

from __future__ import annotations


import pytest
import torch

import bnbx
from bnbx import functional as F
from conftest import BLOCKSIZES, DTYPES, cpu_isa, dtype_id, isa_params
from reference_gemm_4bit import assert_close_to_reference

# Rows of A on each side of the GEMV / GEMM crossovers (150: past 128 rows, where a small x still takes the AMX
# kernel); K values that do and do not fill SIMD groups (128 lanes of AVX-512, 64 of AVX2) or whole blocks, odd K
# (rows start mid-byte) and N.
M_VALUES = [1, 3, 17, 40, 150]
KN_VALUES = [(128, 33), (256, 7), (65, 5), (1, 3), (384, 19)]


ISAS = isa_params("scalar", "avx2", "avx512")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_fused_kernels_match_dequantize_then_matmul(isa, dtype, nested):
    with cpu_isa(isa):
        for quant_type in ("nf4", "fp4"):
            for K, N in KN_VALUES:
                W = torch.randn(N, K, dtype=dtype)
                packed, state = F.quantize_4bit(W, blocksize=64, quant_type=quant_type, compress_statistics=nested)
                bias = torch.randn(N, dtype=dtype)
                for M in M_VALUES:
                    A = torch.randn(M, K, dtype=dtype)
                    assert_close_to_reference(bnbx.matmul_4bit(A, packed.t(), state, bias=bias), A, packed, state, bias)


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("M", [1, 2, 6, 40])
def test_every_blocksize(blocksize, M):
    # K = 128 and 256: blocks of 256..4096 span several rows; K = 4 * 96 = 384 is not a multiple of most
    for K, N in [(128, 67), (256, 9), (384, 21)]:
        W = torch.randn(N, K)
        packed, state = F.quantize_4bit(W, blocksize=blocksize, quant_type="nf4", compress_statistics=True)
        A = torch.randn(M, K, dtype=torch.bfloat16)
        assert_close_to_reference(bnbx.matmul_4bit(A, packed, state), A, packed, state)


@pytest.mark.parametrize("M", [1, 4, 9])
def test_nested_statistics_decode_exactly(M):
    # Decoding inside the kernel gives the same fp32 absmax as QuantState.get_absmax, so the product is
    # bit-identical to the one with the decoded statistics passed as plain fp32.
    W = torch.randn(48, 256)
    packed, state = F.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True)
    A = torch.randn(M, 256)
    nested = torch.ops.bnbx.gemm_4bit(
        A,
        packed,
        state.absmax,
        64,
        "nf4",
        [48, 256],
        None,
        state.state2.absmax,
        state.state2.code,
        state.offset,
        state.state2.blocksize,
    )
    plain = torch.ops.bnbx.gemm_4bit(A, packed, state.get_absmax(), 64, "nf4", [48, 256])
    assert torch.equal(nested, plain)


@pytest.mark.parametrize("path", ["gemv", "amx", "tiles"])
@pytest.mark.parametrize("blocksize", [32, 64])
def test_nested_statistics_across_nested_blocks(path, blocksize, monkeypatch):
    # Enough blocks (N * K / blocksize = 2400 or 1200) that the runs of 16 blocks the kernels decode at a time
    # cross nested blocks of 256 and end in partial runs; bit-identical to the statistics decoded in Python.
    monkeypatch.setenv("BNBX_GEMM_4BIT_GEMV_MAX_M", "64" if path == "gemv" else "0")
    monkeypatch.setenv("BNBX_GEMM_4BIT_AMX_MAX_M", "64" if path == "amx" else "0")
    N, K = 300, 256
    packed, state = F.quantize_4bit(torch.randn(N, K), blocksize=blocksize, compress_statistics=True)
    s2 = state.state2
    for M in (1, 5):
        A = torch.randn(M, K, dtype=torch.bfloat16)
        nested = torch.ops.bnbx.gemm_4bit(
            A, packed, state.absmax, blocksize, "nf4", [N, K], None, s2.absmax, s2.code, state.offset, s2.blocksize
        )
        plain = torch.ops.bnbx.gemm_4bit(A, packed, state.get_absmax(), blocksize, "nf4", [N, K])
        assert torch.equal(nested, plain)


def test_any_leading_shape_and_out():
    W = torch.randn(24, 128)
    packed, state = F.quantize_4bit(W, compress_statistics=False)
    A = torch.randn(2, 3, 5, 128)
    ours = bnbx.matmul_4bit(A, packed, state)
    assert ours.shape == (2, 3, 5, 24)
    flat = bnbx.matmul_4bit(A.reshape(-1, 128), packed, state)
    assert torch.equal(ours.reshape(-1, 24), flat)
    out = torch.empty(2, 3, 5, 24)
    assert bnbx.matmul_4bit(A, packed, state, out=out) is out and torch.equal(out, ours)
    # a non-contiguous input gives the same result
    At = torch.randn(128, 7).t()
    assert torch.equal(bnbx.matmul_4bit(At, packed, state), bnbx.matmul_4bit(At.contiguous(), packed, state))


@pytest.mark.parametrize("shape", [(0, 64), (3, 0)], ids=["no-rows", "no-features"])
def test_empty(shape):
    M, K = shape
    packed, state = F.quantize_4bit(torch.randn(5, K), compress_statistics=False)
    bias = torch.randn(5)
    out = bnbx.matmul_4bit(torch.randn(M, K), packed, state, bias=bias)
    assert out.shape == (M, 5)
    if M:
        assert torch.equal(out, bias.expand(M, 5))  # K = 0: the empty sum is 0, plus the bias


@pytest.mark.parametrize("rows", [1, 16])
def test_quant_storage_views(rows):
    W = torch.randn(40, 128)
    A = torch.randn(rows, 128, dtype=torch.bfloat16)
    packed_u8, state = F.quantize_4bit(W)
    expected = bnbx.matmul_4bit(A, packed_u8, state)
    packed_bf16, state_bf16 = F.quantize_4bit(W, quant_storage=torch.bfloat16)
    assert torch.equal(bnbx.matmul_4bit(A, packed_bf16, state_bf16), expected)


def test_multithreaded_equals_single_thread():
    W = torch.randn(301, 256)
    packed, state = F.quantize_4bit(W, compress_statistics=True)
    threads = torch.get_num_threads()
    for M in (1, 33):
        A = torch.randn(M, 256, dtype=torch.bfloat16)
        many = bnbx.matmul_4bit(A, packed, state)
        torch.set_num_threads(1)
        try:
            one = bnbx.matmul_4bit(A, packed, state)
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(many, one)  # rows of W are split between threads, each row summed by one


@pytest.mark.parametrize("path", ["gemv", "amx", "tiles"])
def test_every_path_at_the_same_m(path, monkeypatch):
    # The crossovers (GEMV, AMX kernel for bf16, dequantized tiles into at::mm) are tuning knobs read from the
    # environment; each path alone must meet the same contract at the same M.
    monkeypatch.setenv("BNBX_GEMM_4BIT_GEMV_MAX_M", "64" if path == "gemv" else "0")
    monkeypatch.setenv("BNBX_GEMM_4BIT_AMX_MAX_M", "64" if path == "amx" else "0")
    # K = 256 and 384: the AMX kernel's fast dequantization (groups of 128 columns; blocks of 64 hold two
    # tables per vpermw, larger ones one, 32 takes the per-32-column loop); 96 and 65: the per-32 / per-element
    # loops. M = 8: chunks of columns in L1; 33: whole blocks of rows.
    for K, N, blocksize in [(256, 64, 64), (384, 37, 128), (256, 33, 32), (96, 50, 64), (65, 7, 64)]:
        packed, state = F.quantize_4bit(torch.randn(N, K), blocksize=blocksize, compress_statistics=True)
        for M in (8, 33):
            A = torch.randn(M, K, dtype=torch.bfloat16)
            assert_close_to_reference(bnbx.matmul_4bit(A, packed, state), A, packed, state)


@pytest.mark.parametrize("path", ["amx", "tiles"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
def test_bias_joins_the_sum_before_the_one_rounding(path, dtype, monkeypatch):
    # The 16-bit GEMMs multiply the weight rounded to A's dtype. With K = 2 the fp32 sum of two products of
    # 16-bit values is the same in any order, so they must give exactly dtype(fp32 sum + bias); adding the bias
    # after rounding the product (twice rounded) differs from it in a good share of the outputs. (The GEMV keeps
    # the fp32 weight and scales each block's sum once, so its sums differ in the last fp32 bit; it adds the
    # bias to its fp32 output and rounds once.)
    if path == "amx" and dtype != torch.bfloat16:
        pytest.skip("the AMX kernel takes bf16 inputs only")
    monkeypatch.setenv("BNBX_GEMM_4BIT_GEMV_MAX_M", "0")
    monkeypatch.setenv("BNBX_GEMM_4BIT_AMX_MAX_M", "64" if path == "amx" else "0")
    packed, state = F.quantize_4bit(torch.randn(301, 2), blocksize=64)
    weight = F.dequantize_4bit(packed, state).to(dtype).float()
    A = torch.randn(33, 2, dtype=dtype) * 3
    bias = torch.randn(301, dtype=dtype) / 7
    expected = (A.float() @ weight.t() + bias.float()).to(dtype)
    twice_rounded = (A.float() @ weight.t()).to(dtype) + bias
    assert not torch.equal(expected, twice_rounded)  # the inputs tell the two apart
    assert torch.equal(bnbx.matmul_4bit(A, packed, state, bias=bias), expected)


# --- autograd --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_input_gradient_is_through_the_dequantized_weight(dtype):
    W = torch.randn(20, 128)
    packed, state = F.quantize_4bit(W, compress_statistics=True)
    dense = F.dequantize_4bit(packed, state).to(dtype)
    for M in (1, 12):
        A = torch.randn(3, M, 128, dtype=dtype, requires_grad=True)
        bias = torch.randn(20, dtype=dtype, requires_grad=True)
        grad = torch.randn(3, M, 20, dtype=dtype)
        bnbx.matmul_4bit(A, packed, state, bias=bias).backward(grad)
        assert torch.equal(A.grad, grad @ dense)  # exactly what the backward computes: grad @ W in A's dtype
        assert torch.equal(bias.grad, grad.reshape(-1, 20).sum(0))


@pytest.mark.parametrize("M", [2, 20], ids=["gemv", "tiled"])
def test_gradcheck(M):
    # The kernels compute in fp32 at most, so gradcheck runs in fp32 with a wide step: the product is linear in
    # A and bias, so central differences are exact up to fp32 rounding (~1e-7 / eps relative).
    packed, state = F.quantize_4bit(torch.randn(6, 128), compress_statistics=True)
    A = torch.randn(M, 128, requires_grad=True)
    bias = torch.randn(6, requires_grad=True)

    def f(A, bias):
        return bnbx.matmul_4bit(A, packed, state, bias=bias)

    with pytest.warns(UserWarning, match="double precision"):
        assert torch.autograd.gradcheck(f, (A, bias), eps=1e-2, atol=2e-3, rtol=2e-3)


def test_weight_gets_no_gradient():
    packed, state = F.quantize_4bit(torch.randn(8, 64), quant_storage=torch.bfloat16)
    packed.requires_grad_(True)  # a float storage view could ask for one
    A = torch.randn(2, 64, requires_grad=True)
    bnbx.matmul_4bit(A, packed, state).sum().backward()
    assert packed.grad is None and A.grad is not None


def test_opcheck_gemm_4bit():
    for nested in (False, True):
        for M, K, N in [(1, 128, 9), (6, 65, 3)] if nested else [(0, 64, 4), (7, 128, 5)]:
            packed, state = F.quantize_4bit(torch.randn(N, K), quant_type="nf4", compress_statistics=nested)
            A = torch.randn(M, K, requires_grad=True)
            bias = torch.randn(N, requires_grad=True)
            s2 = state.state2
            args = (A, packed, state.absmax, 64, "nf4", [N, K], bias)
            if nested:
                args += (s2.absmax, s2.code, state.offset, s2.blocksize)
            torch.library.opcheck(torch.ops.bnbx.gemm_4bit.default, args)


def test_compile_fullgraph_forward():
    packed, state = F.quantize_4bit(torch.randn(32, 128), compress_statistics=True)

    def f(x: torch.Tensor) -> torch.Tensor:
        return bnbx.matmul_4bit(x, packed, state) * 2

    x = torch.randn(3, 128, dtype=torch.bfloat16)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), f(x))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("path", ["gemv", "amx", "tiles"])
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_nan_blocks_stay_in_their_outputs(isa, path, nested, monkeypatch):
    # A block whose absmax is NaN (quantize_4bit stores one for a block holding a NaN or an Inf) dequantizes to
    # NaN: the outputs that use it are NaN, as in dequantize-then-matmul, and no other output is (the kernels'
    # zero padding and partial blocks never meet it). With double quantization a NaN absmax makes its whole
    # nested block of 256 blocks NaN: here rows 0-81 and 163-199 of W, while rows 82-162 stay finite.
    monkeypatch.setenv("BNBX_GEMM_4BIT_GEMV_MAX_M", "64" if path == "gemv" else "0")
    monkeypatch.setenv("BNBX_GEMM_4BIT_AMX_MAX_M", "64" if path == "amx" else "0")
    N, K = 200, 200  # blocks of 64 span rows of W; partial SIMD groups and tiles; 3 nested blocks
    W = torch.randn(N, K)
    W[3, 10] = float("nan")
    W[N - 1, K - 1] = float("inf")
    packed, state = F.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=nested)
    with cpu_isa(isa):
        for M in (1, 5, 33):
            A = torch.randn(M, K, dtype=torch.bfloat16)
            ours = bnbx.matmul_4bit(A, packed, state)
            ref = A.double() @ F.dequantize_4bit(packed, state).double().t()
            assert torch.equal(torch.isnan(ours), torch.isnan(ref)), (M, path)
            assert bool(torch.isnan(ref).any()) and bool(torch.isfinite(ref).any())
