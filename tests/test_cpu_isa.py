"""Every CPU instruction set gives the scalar kernels' results bit for bit.

The scalar build of csrc/cpu/kernels/*_impl.h (the generic loops) defines the result; the AVX2 and AVX-512
builds add hand-written SIMD paths that must give the same packed bytes, absmax, scales and outputs, NaN
payloads included. Each test runs the same call under "scalar" and under the instruction set being tested
(bnbx._library.set_cpu_capability switches the kernel table in-process) and compares bit patterns, so a
NaN matches a NaN. Instruction sets this CPU lacks are skipped with the reason.

The inputs aim at the SIMD paths' edges: partial last blocks and odd element counts (masked or scalar
tails), counts that fill several groups of 16 blocks (the batched absmax path for blocksize <= 256),
NaN/Inf/all-zero/-0/subnormal/FLT_MAX blocks, values on the rounding thresholds, every 16-bit pattern,
adversarial absmax bit patterns for dequantize, outputs of >= 16 MiB (non-temporal stores) and a
misaligned out= tensor.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from bnbx import functional as F
from conftest import BLOCKSIZES, DTYPES, QUANT_TYPES, cpu_isa, dtype_id, isa_params


ISAS = isa_params("avx2", "avx512")

# Element counts: empty, tiny, around one block, odd, and enough for several groups of 16 blocks of 256.
SIZES = [0, 1, 2, 7, 31, 63, 64, 65, 129, 1000, 4097, 40000 + 3]
INPUT_KINDS = ["randn", "special_blocks", "thresholds", "bit_patterns"]

# NF4 midpoints and FP4 magnitude pivots (csrc/common/formats.h), probed at, just above and just below.
_THRESHOLDS = torch.tensor(
    [-0.8480964004993439, -0.6106329262256622, -0.4599952697753906, -0.33967943489551544, -0.23460740596055984,
     -0.13791173323988914, -0.045525018125772476, 0.03979014977812767, 0.1202552504837513, 0.2035212516784668,
     0.2920137718319893, 0.3893125355243683, 0.5016634166240692, 0.6427869200706482, 0.8614784181118011,
     0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667, 0.583333, 0.8333333],
    dtype=torch.float32,
)  # fmt: skip
_BITS_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def on_both(isa: str, fn):
    """fn() under the scalar kernels and under `isa`; returns (scalar result, isa result)."""
    with cpu_isa("scalar"):
        expected = fn()
    with cpu_isa(isa):
        actual = fn()
    return expected, actual


def assert_bits_equal(actual, expected, what: str) -> None:
    """Same shape, dtype and bit pattern (so NaN equals NaN with the same payload)."""
    if isinstance(expected, (tuple, list)):
        assert len(actual) == len(expected)
        for index, (a, e) in enumerate(zip(actual, expected)):
            assert_bits_equal(a, e, f"{what}[{index}]")
        return
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    if expected.is_floating_point():
        view = _BITS_VIEW[expected.element_size()]
        actual, expected = actual.contiguous().view(view), expected.contiguous().view(view)
    if not torch.equal(actual, expected):
        bad = (actual.reshape(-1) != expected.reshape(-1)).nonzero().reshape(-1)
        pytest.fail(
            f"{what}: {bad.numel()} elements differ, first at flat index {bad[:5].tolist()}: "
            f"{actual.reshape(-1)[bad[:5]].tolist()} vs scalar {expected.reshape(-1)[bad[:5]].tolist()}"
        )


def make_input(n: int, dtype: torch.dtype, blocksize: int, kind: str) -> torch.Tensor:
    if kind == "randn" or n == 0:
        return (torch.randn(n) * 3).to(dtype)
    if kind == "bit_patterns":
        # every 16-bit pattern is equally likely (NaN, Inf, subnormals, -0 included); fp32: random words
        if dtype == torch.float32:
            return torch.randint(-(2**31), 2**31 - 1, (n,), dtype=torch.int32).view(torch.float32)
        return torch.randint(-(2**15), 2**15, (n,), dtype=torch.int16).view(dtype)
    if kind == "thresholds":
        # each block's absmax is exactly 1, the other values sit on, above and below the thresholds
        probes = torch.cat([_THRESHOLDS, -_THRESHOLDS, torch.tensor([0.0, -0.0, 1.0, -1.0])])
        probes = torch.cat([probes, probes.nextafter(torch.tensor(2.0)), probes.nextafter(torch.tensor(-2.0))])
        values = probes[torch.randint(0, probes.numel(), (n,))]
        values[::blocksize] = torch.where(torch.arange(0, n, blocksize) % 2 == 0, 1.0, -1.0)
        return values.to(dtype)
    values = torch.randn(n) * 3
    blocks = (n + blocksize - 1) // blocksize
    for block in range(blocks):
        start, end = block * blocksize, min(n, (block + 1) * blocksize)
        size = end - start
        pattern = block % 10
        if pattern == 1:
            values[start:end] = 0.0
        elif pattern == 2:
            values[start:end] = -0.0
        elif pattern == 3:
            values[start + size // 2] = float("nan")
        elif pattern == 4:
            values[end - 1] = float("inf")
        elif pattern == 5:
            values[start] = float("-inf")
        elif pattern == 6:
            values[start:end] = torch.randn(size) * 1e-40  # fp32 subnormal absmax (zeros in fp16)
        elif pattern == 7:
            values[start:end] = torch.randn(size).sign() * 3.4028234663852886e38  # FLT_MAX
        elif pattern == 8:
            values[start:end] = torch.randn(size) * 1e-6  # fp16 subnormals
        elif pattern == 9:
            values[start:end] = torch.randn(size) * 6e4  # near the fp16 maximum
    return values.to(dtype)


# --- 4-bit ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("isa", ISAS)
def test_quantize_4bit(isa, dtype, quant_type, blocksize):
    for n, kind in itertools.product(SIZES, INPUT_KINDS):
        A = make_input(n, dtype, blocksize, kind)
        expected, actual = on_both(isa, lambda: torch.ops.bnbx.quantize_4bit(A, blocksize, quant_type, torch.uint8))
        assert_bits_equal(actual, expected, f"quantize_4bit n={n} {kind}")
        packed, absmax = expected
        for out_dtype in DTYPES:
            expected_out, actual_out = on_both(
                isa, lambda: torch.ops.bnbx.dequantize_4bit(packed, absmax, blocksize, quant_type, [n], out_dtype)
            )
            assert_bits_equal(actual_out, expected_out, f"dequantize_4bit n={n} {kind} -> {dtype_id(out_dtype)}")


@pytest.mark.parametrize("out_dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("isa", ISAS)
def test_dequantize_4bit_any_absmax(isa, quant_type, out_dtype):
    # Code 15 of NF4 is 1.0, so blocks of 0xff bytes return absmax itself, rounded: this walks the fp16/bf16
    # rounding over random words and over every high half-word with the low halves at the rounding edges.
    high = torch.arange(65536, dtype=torch.int32) << 16
    low = torch.tensor([0, 1, 0x0FFF, 0x1000, 0x1001, 0x1FFF, 0x2000, 0x7FFF, 0x8000, 0x8001, 0xEFFF, 0xF000, 0xFFFF],
                       dtype=torch.int32)  # fmt: skip
    words = torch.cat([(high[:, None] | low[None, :]).reshape(-1), torch.randint(-(2**31), 2**31 - 1, (1 << 18,))])
    absmax = words.view(torch.float32)
    blocksize = 32
    n = absmax.numel() * blocksize
    for packed in (torch.full((n // 2,), 0xFF, dtype=torch.uint8), torch.randint(0, 256, (n // 2,), dtype=torch.uint8)):
        expected, actual = on_both(
            isa, lambda: torch.ops.bnbx.dequantize_4bit(packed, absmax, blocksize, quant_type, [n], out_dtype)
        )
        assert_bits_equal(actual, expected, "dequantize_4bit with arbitrary absmax")


@pytest.mark.parametrize("compress_statistics", [False, True], ids=["plain", "double_quant"])
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("isa", ISAS)
def test_functional_4bit_shapes(isa, dtype, quant_type, compress_statistics):
    for shape in [(3, 129), (2, 5, 7), (64, 64), (17, 33), (4, 4098), (2, 3, 1000)]:
        A = (torch.randn(shape) * 2).to(dtype)

        def run():
            packed, state = F.quantize_4bit(
                A, blocksize=64, quant_type=quant_type, compress_statistics=compress_statistics
            )
            return packed, state.absmax, F.dequantize_4bit(packed, state)

        expected, actual = on_both(isa, run)
        assert_bits_equal(actual, expected, f"functional 4-bit {shape}")


@pytest.mark.parametrize("out_dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("isa", ISAS)
def test_dequantize_4bit_large_and_misaligned_out(isa, out_dtype):
    # >= 16 MiB of output takes the non-temporal store path; an out= view one element into its storage is
    # not 64-byte aligned and must take the ordinary one. Both give the same values.
    shape = (4096, 2048 + 64)
    A = torch.randn(shape, dtype=torch.bfloat16)
    packed, absmax = torch.ops.bnbx.quantize_4bit(A, 64, "nf4", torch.uint8)

    def run():
        whole = torch.ops.bnbx.dequantize_4bit(packed, absmax, 64, "nf4", list(shape), out_dtype)
        storage = torch.empty(A.numel() + 1, dtype=out_dtype)
        out = storage[1:].view(shape)
        torch.ops.bnbx.dequantize_4bit.out(packed, absmax, 64, "nf4", list(shape), out_dtype, out=out)
        return whole, out

    expected, actual = on_both(isa, run)
    assert_bits_equal(actual, expected, "large dequantize_4bit")
    assert_bits_equal(actual[1], actual[0], "misaligned out= vs fresh output")


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("isa", ISAS)
def test_quantize_4bit_thread_splits(isa, threads):
    # the host splits blocks across threads; group boundaries of the batched path move with the split
    A = make_input(64 * 1000 + 17, torch.bfloat16, 64, "special_blocks")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        expected, actual = on_both(isa, lambda: torch.ops.bnbx.quantize_4bit(A, 64, "fp4", torch.uint8))
    finally:
        torch.set_num_threads(previous)
    assert_bits_equal(actual, expected, f"quantize_4bit with {threads} threads")


@pytest.mark.parametrize("isa", ISAS)
def test_flush_denormal_mode(isa):
    # torch.set_flush_denormal(True) sets FTZ/DAZ in this thread: float compares then see subnormals as zero.
    # The SIMD entry points fall back to the generic loops there, so every instruction set agrees. One
    # thread, because the flag is per thread and the pool's threads keep their own.
    A = torch.randint(1, 0x7FFFFF, (64 * 40 + 3,), dtype=torch.int32).view(torch.float32).clone()  # subnormals
    A[64:128] = torch.randn(64)
    previous_threads = torch.get_num_threads()
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    torch.set_num_threads(1)
    try:
        for dtype in DTYPES:
            high_halves = A.view(torch.int32).bitwise_right_shift(16).to(torch.int16)
            X = A.to(dtype) if dtype == torch.float32 else high_halves.view(dtype)

            def run():
                packed, absmax = torch.ops.bnbx.quantize_4bit(X, 64, "fp4", torch.uint8)
                codes, absmax8 = torch.ops.bnbx.quantize_blockwise(X, F.create_dynamic_map(), 256)
                q, scale, zero_point = torch.ops.bnbx.quantize_int8(X, 64, False)
                return (
                    packed,
                    absmax,
                    torch.ops.bnbx.dequantize_4bit(packed, absmax, 64, "fp4", [X.numel()], dtype),
                    codes,
                    absmax8,
                    q,
                    scale,
                    zero_point,
                )

            expected, actual = on_both(isa, run)
            assert_bits_equal(actual, expected, f"flush-denormal mode {dtype_id(dtype)}")
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(previous_threads)


# --- 8-bit blockwise and int8 -----------------------------------------------------------------------------


@pytest.mark.parametrize("blocksize", [64, 256, 4096])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("isa", ISAS)
def test_blockwise_8bit(isa, dtype, blocksize):
    code = F.create_dynamic_map()
    for n, kind in itertools.product(SIZES, INPUT_KINDS):
        A = make_input(n, dtype, blocksize, kind)
        expected, actual = on_both(isa, lambda: torch.ops.bnbx.quantize_blockwise(A, code, blocksize))
        assert_bits_equal(actual, expected, f"quantize_blockwise n={n} {kind}")
        codes, absmax = expected
        for out_dtype in DTYPES:
            expected_out, actual_out = on_both(
                isa, lambda: torch.ops.bnbx.dequantize_blockwise(codes, absmax, code, blocksize, out_dtype)
            )
            assert_bits_equal(actual_out, expected_out, f"dequantize_blockwise n={n} {kind} -> {dtype_id(out_dtype)}")


@pytest.mark.parametrize("isa", ISAS)
def test_quantize_blockwise_unusual_codes(isa):
    # duplicates and infinite neighbours make equal or NaN midpoints: the SIMD searches must probe the same
    # midpoints as the scalar binary search to land on the same index
    values = torch.sort(torch.randn(256)).values
    values[:3] = -float("inf")
    values[100:140] = values[100]
    values[-3:] = float("inf")
    for code in (values, torch.full((256,), 0.5), torch.linspace(-1, 1, 256)):
        for dtype in DTYPES:
            A = make_input(40000 + 3, dtype, 256, "special_blocks")
            expected, actual = on_both(isa, lambda: torch.ops.bnbx.quantize_blockwise(A, code, 256))
            assert_bits_equal(actual, expected, "quantize_blockwise with an unusual code")


@pytest.mark.parametrize("blocksize", [64, 256])  # 256 and up: AVX-512's per-block lookup table
@pytest.mark.parametrize("out_dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("isa", ISAS)
def test_dequantize_blockwise_any_absmax(isa, out_dtype, blocksize):
    code = F.create_dynamic_map()
    absmax = torch.randint(-(2**31), 2**31 - 1, (1 << 14,), dtype=torch.int32).view(torch.float32)
    codes = torch.randint(0, 256, (absmax.numel() * blocksize - 5,), dtype=torch.uint8)
    expected, actual = on_both(
        isa, lambda: torch.ops.bnbx.dequantize_blockwise(codes, absmax, code, blocksize, out_dtype)
    )
    assert_bits_equal(actual, expected, "dequantize_blockwise with arbitrary absmax")


@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "zero_point"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("isa", ISAS)
def test_int8(isa, dtype, symmetric):
    for n, group_size, kind in itertools.product(SIZES, [1, 3, 16, 64, 100, 128, 4096], INPUT_KINDS):
        A = make_input(n, dtype, max(group_size, 32), kind)
        expected, actual = on_both(isa, lambda: torch.ops.bnbx.quantize_int8(A, group_size, symmetric))
        assert_bits_equal(actual, expected, f"quantize_int8 n={n} group={group_size} {kind}")
        q, scale, zero_point = expected
        for out_dtype in DTYPES:
            expected_out, actual_out = on_both(
                isa, lambda: torch.ops.bnbx.dequantize_int8(q, scale, zero_point, group_size, out_dtype)
            )
            assert_bits_equal(actual_out, expected_out, f"dequantize_int8 n={n} group={group_size} {kind}")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("isa", ISAS)
def test_quantize_blockwise_midpoint_ties(isa, dtype):
    # values on the dynamic map's fp32 midpoints (the rule keeps the even index there), on the codes, and one
    # ulp either side; each block's absmax is exactly 1, so the scaled values are these values
    code = F.create_dynamic_map()
    mids = (code[1:] + code[:-1]) * 0.5
    probes = torch.cat([mids, code, mids.nextafter(torch.tensor(2.0)), mids.nextafter(torch.tensor(-2.0))])
    values = probes[torch.randint(0, probes.numel(), (40000 + 3,))]
    values[::256] = 1.0
    A = values.to(dtype)
    expected, actual = on_both(isa, lambda: torch.ops.bnbx.quantize_blockwise(A, code, 256))
    assert_bits_equal(actual, expected, "quantize_blockwise on midpoints")
