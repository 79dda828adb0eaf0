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
from reference import HALF_ULP
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
    assert lib.bnbx_emu_selftest(4) == 1 and b"__syncthreads_or" in lib.bnbx_emu_error()


def test_emulator_checks_the_warp_matrix_functions(emu):
    # wmma_shim.h: a correct product (row-major A, column-major B, fp32 D) is exact on small integers; calls CUDA
    # leaves undefined are reported
    lib = emu.lib
    assert lib.bnbx_emu_wmma_selftest(0) == 0, lib.bnbx_emu_error().decode()
    assert lib.bnbx_emu_wmma_selftest(1) == 1 and b"differs between the lanes" in lib.bnbx_emu_error()
    assert lib.bnbx_emu_wmma_selftest(2) == 1 and b"256-bit aligned" in lib.bnbx_emu_error()
    assert lib.bnbx_emu_wmma_selftest(3) == 1 and b"multiple of 16 bytes" in lib.bnbx_emu_error()
    assert lib.bnbx_emu_wmma_selftest(4) == 1 and b"exited" in lib.bnbx_emu_error()


# --- MinMax fake_quantize (csrc/cuda/fake_quant.cu): values, scale and zero point bit for bit ----------------------

# (group_size, n): one-element and odd groups, partial last groups, a group one past 4096, per tensor (1 << 40).
# Every group is a grid-stride step of a 256-thread block with barriers, slow to emulate: few small groups.
FQ_CASES = [(1, 7), (3, 20), (17, 130), (64, 300), (65, 300), (4097, 4098), (1 << 40, 1), (1 << 40, 4097)]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("full_range", [True, False], ids=["full", "restricted"])
def test_fake_quantize_matches_cpu(emu, dtype, symmetric, full_range):
    for bits, cases in ((8, FQ_CASES), (4, [FQ_CASES[2], FQ_CASES[-1]])):
        for group_size, n in cases:
            x = special_input(n, dtype, min(group_size, 4096), _gen("fq", n, group_size, bits, symmetric, str(dtype)))
            out, scale, zero_point, segments = emu.fake_quantize(x, group_size, bits, symmetric, full_range)
            assert (segments > 0) == (group_size > 65536)  # a per-tensor group is split even when small
            cpu = torch.ops.bnbx.fake_quantize(x, min(group_size, n), bits, symmetric, full_range, "none", 1.0)
            what = f"bits={bits} group={group_size} n={n}"
            assert_same_bits(out, cpu[0], f"values {what}")
            assert_same_bits(scale, cpu[1], f"scale {what}")
            assert_same_bits(zero_point, cpu[2], f"zero_point {what}")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_fake_quantize_split_groups_match_cpu(emu, dtype):
    # groups above 65536 elements and fewer than the emulated GPU's resident blocks take the three-kernel path
    for n, group_size, symmetric in [(66001, 66001, True), (140001, 70000, False)][: 1 if QUICK else 2]:
        x = torch.randn(n, generator=_gen("fq-split", n, str(dtype))).to(dtype)
        x[n // 2] = 40.0  # the range comes from one element of the second segment
        out, scale, zero_point, segments = emu.fake_quantize(x, group_size, 8, symmetric, False)
        assert segments >= 2
        cpu = torch.ops.bnbx.fake_quantize(x, group_size, 8, symmetric, False, "none", 1.0)
        assert_same_bits(out, cpu[0], f"values n={n}")
        assert_same_bits(scale, cpu[1], f"scale n={n}")
        assert_same_bits(zero_point, cpu[2], f"zero_point n={n}")


# --- LLM.int8() (csrc/cuda/int8_matmul.cu): codes, statistics, int32 products and epilogues bit for bit ------------

INT8_SHAPES = [(1, 1), (3, 17), (17, 63), (5, 65), (2, 300)]  # (rows, K); one 256-thread block per row


def _with_outlier_columns(rows: int, K: int, dtype, columns: int, key) -> torch.Tensor:
    """Normal activations (|x| mostly < 3) with `columns` outlier columns, |x| up to 60 in some rows."""
    g = _gen("outliers", rows, K, columns, str(dtype), key)
    A = torch.randn(rows, K, generator=g)
    for c in torch.randperm(K, generator=g)[:columns].tolist():
        A[torch.randint(0, rows, (2,), generator=g), c] = torch.empty(2).uniform_(-60, 60, generator=g)
    A[:, 0] = 3.0 if columns else A[:, 0]  # exactly the threshold counts as an outlier
    return A.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("threshold", [0.0, 3.0])
def test_int8_vectorwise_quant_matches_cpu(emu, dtype, threshold):
    for rows, K in INT8_SHAPES:
        # one row per block of special_input: NaN, +-Inf, zero, subnormal and FLT_MAX rows
        inputs = [special_input(rows * K, dtype, K, _gen("vq", rows, K, str(dtype))).reshape(rows, K)]
        if threshold:  # outlier columns, and none at all (the mask is computed, then not passed on)
            inputs += [
                _with_outlier_columns(rows, K, dtype, min(K, 3), "vq"),
                inputs[0].nan_to_num(0, 0, 0).clamp(-2, 2),
            ]
        for A in inputs:
            q, stats, cols = emu.int8_vectorwise_quant(A, threshold)
            cpu_q, cpu_stats, cpu_cols = torch.ops.bnbx.int8_vectorwise_quant(A, threshold)
            assert_same_bits(q, cpu_q, f"q {rows}x{K}")
            assert_same_bits(stats, cpu_stats, f"stats {rows}x{K}")
            assert_same_bits(cols, cpu_cols, f"outlier columns {rows}x{K}")
            out = emu.int8_vectorwise_dequant(q, stats)
            assert_same_bits(out, torch.ops.bnbx.int8_vectorwise_dequant(cpu_q, cpu_stats), f"dequant {rows}x{K}")


def test_int8_vectorwise_quant_tiny_rows(emu):
    # a row whose absmax is below 2^-128 (fp32/bf16 only) overflows 127 / absmax: its codes are 0 on the CPU and,
    # since the emulation found the saturating conversion gave -1 for positive x, on CUDA too (stats are kept)
    for dtype in (torch.float32, torch.bfloat16):
        A = torch.tensor([[1e-39, -2e-39, 3e-40, 0.0], [1.0, -0.5, 0.25, 0.0]]).to(dtype)
        q, stats, _ = emu.int8_vectorwise_quant(A)
        cpu_q, cpu_stats, _ = torch.ops.bnbx.int8_vectorwise_quant(A)
        assert_same_bits(q, cpu_q, str(dtype))
        assert_same_bits(stats, cpu_stats, str(dtype))
        assert q[0].eq(0).all() and stats[0].item() > 0 and q[1].tolist() == [127, -64, 32, 0]


def test_int8_vectorwise_quant_3d_and_empty(emu):
    A = torch.randn(2, 3, 17, generator=_gen("vq3d")).half()
    for got, want in zip(emu.int8_vectorwise_quant(A, 1.5), torch.ops.bnbx.int8_vectorwise_quant(A, 1.5)):
        assert_same_bits(got, want, "3-D A")
    for A in (torch.randn(0, 5), torch.randn(4, 0)):
        for got, want in zip(emu.int8_vectorwise_quant(A, 1.0), torch.ops.bnbx.int8_vectorwise_quant(A, 1.0)):
            assert_same_bits(got, want, f"empty {tuple(A.shape)}")


# M, N, K: one, odd, one short of and one past the 64 x 64 tile and the 64-byte K step, several steps
GEMM_M = [1, 3, 17, 63, 65]
GEMM_N = [1, 17, 64, 65]
GEMM_K = [1, 3, 17, 63, 65, 130]


@pytest.mark.parametrize("K", GEMM_K)
def test_int8_linear_matmul_matches_cpu(emu, K):
    for M in GEMM_M:
        for N in GEMM_N if not QUICK else GEMM_N[::2]:
            g = _gen("gemm", M, N, K)
            A = torch.randint(-128, 128, (M, K), dtype=torch.int8, generator=g)
            B = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=g)
            if M > 2:
                A[1] = -128  # the extremes: -128 * -128 at every k
                B[0] = -128
            assert_same_bits(emu.int8_linear_matmul(A, B), torch.ops.bnbx.int8_linear_matmul(A, B), f"{M}x{N}x{K}")


def test_int8_linear_matmul_largest_sums(emu):
    # |sum| up to 128 * 128 * K near int32's limit (K = 2^17 - 1 is the checked maximum; 4096 here keeps it fast)
    K = 4096
    A = torch.full((2, K), -128, dtype=torch.int8)
    B = torch.stack([torch.full((K,), -128, dtype=torch.int8), torch.full((K,), 127, dtype=torch.int8)])
    C = emu.int8_linear_matmul(A, B)
    assert_same_bits(C, torch.ops.bnbx.int8_linear_matmul(A, B))
    assert C[0, 0].item() == 128 * 128 * K


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("bias_dtype", [None, *DTYPES], ids=lambda d: "nobias" if d is None else dtype_id(d))
def test_int8_mm_dequant_matches_cpu(emu, dtype, bias_dtype):
    for rows, N in [(1, 1), (3, 17), (17, 65), (65, 3)]:
        g = _gen("mmdq", rows, N, str(dtype), str(bias_dtype))
        C = torch.randint(-(1 << 24), 1 << 24, (rows, N), dtype=torch.int32, generator=g)
        row_stats = torch.rand(rows, generator=g) * 10
        col_stats = torch.rand(N, generator=g) * 3
        bias = None if bias_dtype is None else torch.randn(N, generator=g).to(bias_dtype)
        out = emu.int8_mm_dequant(C, row_stats, col_stats, dtype, bias)
        assert_same_bits(out, torch.ops.bnbx.int8_mm_dequant(C, row_stats, col_stats, dtype, bias), f"{rows}x{N}")


# outlier columns: none (threshold 0), a few (fused into the epilogue), more than 32 (epilogue in fp32 + addmm)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("outliers", [0, 3, 40], ids=["thr0", "3cols", "40cols"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_int8_mixed_linear_matches_cpu(emu, dtype, outliers, with_bias):
    threshold = 3.0 if outliers else 0.0
    for rows, K, N in [(1, 65, 3), (17, 63, 65)] if outliers <= 32 else [(5, 65, 17)]:
        A = _with_outlier_columns(rows, K, dtype, outliers, "mixed")
        g = _gen("mixed-w", rows, K, N)
        CB = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
        SCB = torch.rand(N, generator=g) * 2
        bias = torch.randn(N, generator=g).to(dtype) if with_bias else None
        out = emu.int8_mixed_linear(A, CB, SCB, bias, threshold)
        cpu = torch.ops.bnbx.int8_mixed_linear(A, CB, SCB, bias, threshold)
        assert_same_bits(out, cpu, f"{rows}x{K}x{N}")
        if outliers:
            assert emu.int8_vectorwise_quant(A, threshold)[2].numel() >= min(outliers, K) - 1


# --- gemm_4bit (csrc/cuda/gemm_4bit.cu): fp32 accumulation, so within a bound derived from K ------------------------

# (M, N, K): K % 8 == 0 takes the 4-byte GEMV path (K = 264: two steps of a warp), other K the code-at-a-time
# one; M > 8 the decode + dequantize + cuBLAS path (emulated up to its at::mm).
# K % 32 == 0 (16-byte loads: 64, 96, 1024), K % 8 == 0 (4-byte loads: 264, 136), and code at a time
GEMV_SHAPES = [
    (1, 1, 1),
    (1, 17, 65),
    (3, 65, 64),
    (8, 3, 264),
    (2, 63, 17),
    (3, 9, 3),
    (17, 5, 63),
    (5, 4, 136),
    (2, 33, 96),
    (7, 6, 1024),
]


def _nested_scales(blocks: int, key):
    """Double quantization: uint8 codes of the absmax, decoded with a 256-value code, per-64-block scales and an
    offset."""
    g = _gen("nested", blocks, key)
    absmax_q = torch.randint(0, 256, (blocks,), dtype=torch.uint8, generator=g)
    nested_code = create_dynamic_map(signed=True)
    nested_absmax = torch.rand(-(-blocks // 64), generator=g) * 0.5 + 0.01
    offset = torch.tensor(0.3)
    decoded = nested_code[absmax_q.long()] * nested_absmax.repeat_interleave(64)[:blocks] + offset  # fp32
    return (nested_absmax, nested_code, offset, 64), absmax_q, decoded


def _gemm_4bit_bound(A: torch.Tensor, weight: torch.Tensor, bias, ref: torch.Tensor, K: int) -> torch.Tensor:
    """|error| bound of an fp32 dot product of K terms: each term passes at most K + 16 roundings (its product,
    the 8-term partial sum, the block scale, the lane's running sum, 5 shuffle levels, the bias), so
    (K + 16) * 2^-24 * sum |a w| (+ |bias|), plus half an ulp of the output dtype and its smallest subnormal.
    The large-M path also rounds the weight to A's dtype (one unit per term) and adds the bias after rounding."""
    magnitude = A.double().abs() @ weight.double().abs().t()
    if bias is not None:
        magnitude = magnitude + bias.double().abs()
    unit = HALF_ULP[A.dtype]
    tiny = torch.finfo(A.dtype).smallest_normal * torch.finfo(A.dtype).eps
    bound = (K + 16) * 2.0**-24 * magnitude * (1 + unit) + unit * ref.abs() + tiny
    if A.shape[0] > 8:
        bound = bound + 2 * unit * magnitude + 2 * unit * ref.abs() + tiny
    return bound


def _check_gemm_4bit(
    emu,
    M,
    N,
    K,
    blocksize,
    quant_type,
    dtype,
    nested: bool,
    with_bias: bool,
    offset_a: bool = False,
    nonfinite: bool = False,
    **kwargs,
) -> None:
    """The emulated gemm_4bit_cuda against the float64 product of A and the dequantized weight. ``nonfinite``:
    the first and the last block's absmax are NaN, as quantize_4bit stores a block holding a NaN or an Inf;
    the outputs they reach must be NaN, every other output finite and close."""
    from reference import dequantize_4bit_ref

    g = _gen("gemm4", M, N, K, blocksize, quant_type, str(dtype))
    W = torch.randn(N, K, generator=g) * torch.exp2(torch.randint(-3, 4, (N, 1), generator=g).float())
    packed, absmax = torch.ops.bnbx.quantize_4bit(W, blocksize, quant_type, torch.uint8)
    packed = packed.reshape(-1)
    if nonfinite:
        absmax[0] = absmax[-1] = float("nan")
    scales, stats, decoded = None, absmax, absmax
    if nested:
        scales, stats, decoded = _nested_scales(absmax.numel(), (M, N, K, blocksize))
        assert_same_bits(emu.decode_absmax(stats, *scales), decoded, "decoded absmax")
    A = torch.randn(M, K, generator=g).to(dtype)
    if offset_a:  # contiguous but 2 bytes past a 16-byte boundary: no vector loads of A
        A = torch.cat([A.new_zeros(1), A.reshape(-1)])[1:].view(M, K)
    bias = torch.randn(N, generator=g).to(dtype) if with_bias else None
    out = emu.gemm_4bit(A, packed, stats, blocksize, quant_type, (N, K), bias, scales, **kwargs)
    weight = dequantize_4bit_ref(packed, decoded, blocksize, quant_type, (N, K), torch.float32)
    ref = A.double() @ weight.double().t() + (0 if bias is None else bias.double())
    assert out.dtype == dtype and out.shape == (M, N)
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isnan(out), torch.isnan(ref)), f"{M}x{N}x{K}: NaN outputs differ from the reference"
    assert torch.equal(out.double()[torch.isinf(ref)], ref[torch.isinf(ref)]), f"{M}x{N}x{K}: Inf outputs differ"
    bound = _gemm_4bit_bound(A, weight.nan_to_num(0.0, 0.0, 0.0), bias, ref.nan_to_num(0.0, 0.0, 0.0), K)
    err = (out.double() - ref).abs()
    assert bool((err[finite] <= bound[finite]).all()), f"{M}x{N}x{K}: error above the bound"
    assert not nonfinite or not bool(finite.all()), "the non-finite blocks reached no output"


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_gemm_4bit_matches_reference(emu, dtype, quant_type, blocksize):
    # half the shapes per blocksize, rotating (emulated warp shuffles are slow); every shape runs with every
    # dtype and quant type, and with four blocksizes
    pick = BLOCKSIZES.index(blocksize)
    shapes = [shape for j, shape in enumerate(GEMV_SHAPES) if (j + pick) % 2 == 0 or j == 0]
    for i, (M, N, K) in enumerate(shapes[::2] if QUICK else shapes):
        _check_gemm_4bit(emu, M, N, K, blocksize, quant_type, dtype, nested=i % 2 == 1, with_bias=i % 3 != 1)


# The tensor-core tiles: 16-row tiles up to M = 16, 64-row tiles above (M = 130 with the limit raised: three
# tiles down M); N and K on both sides of the 64-wide tiles, K % 8 != 0 (codes read one at a time, rows of W
# starting mid-byte), a single element; A 16-byte aligned (vector loads) or not; K long enough to be split.
TILES_SHAPES = [
    (9, 1, 1),
    (16, 65, 64),
    (17, 64, 136),
    (33, 131, 7),
    (64, 5, 200),
    (65, 70, 72),
    (130, 3, 65),
    (12, 9, 777),  # K split in 3 slices (the emulated GPU's 48 resident blocks against 1 tile), the last partial
    (17, 70, 1000),  # K split in 4, summed afterwards
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("M, K", [(3, 136), (17, 136), (12, 777)], ids=["gemv", "tiles", "tiles-split-k"])
def test_gemm_4bit_nonfinite_blocks_stay_in_their_outputs(emu, dtype, M, K):
    # zero padding past M, N and K must never meet a NaN weight in a kept output
    _check_gemm_4bit(emu, M, 70, K, 64, "nf4", dtype, nested=False, with_bias=True, nonfinite=True, tiles_max_rows=64)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_gemm_4bit_tiles_match_reference(emu, dtype, quant_type):
    for i, (M, N, K) in enumerate(TILES_SHAPES[::2] if QUICK else TILES_SHAPES):
        blocksize = BLOCKSIZES[(3 * i + len(quant_type)) % len(BLOCKSIZES)]
        nested, with_bias = i % 2 == 1, i % 3 != 1
        offset_a = K % 8 == 0 and i % 2 == 0
        _check_gemm_4bit(emu, M, N, K, blocksize, quant_type, dtype, nested, with_bias, offset_a, tiles_max_rows=256)


def test_python_copies_of_the_cuda_crossovers_match_the_source():
    # The emulation wrapper and the CUDA benchmark repeat gemm_4bit_cuda's dispatch rule; they must not drift
    import re
    import sys

    from cuda_emulation import CSRC, Emulator

    source = (CSRC / "cuda" / "gemm_4bit.cu").read_text()
    gemv = int(re.search(r"constexpr int kGemvMaxRows = (\d+);", source).group(1))
    tiles = int(re.search(r"constexpr int64_t kTilesMaxRows = (\d+);", source).group(1))
    sys.path.insert(0, str(CSRC.parent / "benchmarks"))
    import bench_cuda_matmul_4bit as bench

    assert (Emulator.GEMV_MAX_ROWS, Emulator.TILES_MAX_ROWS) == (gemv, tiles)
    assert (bench.GEMV_MAX_ROWS, bench.TILES_MAX_ROWS) == (gemv, tiles)
