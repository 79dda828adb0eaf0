"""4-bit NF4/FP4 blockwise quantization against the plain-torch reference, and its contracts."""

from __future__ import annotations

import pytest
import torch

import bnbx
from bnbx import functional as F
from conftest import BLOCKSIZES, DEVICES, DTYPES, QUANT_TYPES, dtype_id
from reference import dequantize_4bit_ref, quantize_4bit_ref, unpack_4bit_ref

SHAPES = [(1,), (63,), (64,), (65,), (4097,), (3, 129), (2, 3, 65), (0,), (0, 64)]

# bitsandbytes' round-trip thresholds on 1024x1024 randn (mean + 7 std over 200 runs, guide §10):
# mean absolute error must not exceed them.
BNB_MEAN_ABS_ERROR = {
    ("nf4", 32): 0.06823, ("nf4", 64): 0.07332, ("nf4", 128): 0.07747, ("nf4", 256): 0.08105,
    ("nf4", 512): 0.08455, ("nf4", 1024): 0.08792, ("nf4", 2048): 0.09135, ("nf4", 4096): 0.09507,
    ("fp4", 32): 0.08956, ("fp4", 64): 0.09732, ("fp4", 128): 0.10391, ("fp4", 256): 0.10996,
    ("fp4", 512): 0.11575, ("fp4", 1024): 0.12157, ("fp4", 2048): 0.12774, ("fp4", 4096): 0.13382,
}  # fmt: skip
DOUBLE_QUANT_MEAN_ABS_ERROR = 0.11  # bitsandbytes' bound for blocksizes 32..128


def assert_same_with_nan(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Bit-for-bit equality where NaN equals NaN (the NaN/Inf contract makes NaN outputs)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert torch.equal(torch.isnan(actual), torch.isnan(expected))
    mask = ~torch.isnan(actual)
    assert torch.equal(actual[mask], expected[mask])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(device, quant_type, blocksize, dtype, shape):
    A = torch.randn(shape, dtype=dtype) * 3
    packed, state = F.quantize_4bit(A.to(device), blocksize=blocksize, quant_type=quant_type)
    expected_packed, expected_absmax = quantize_4bit_ref(A, blocksize, quant_type)
    assert packed.shape == ((A.numel() + 1) // 2, 1) and packed.dtype == torch.uint8
    assert torch.equal(packed.view(-1).cpu(), expected_packed)
    assert torch.equal(state.absmax.cpu(), expected_absmax)
    assert state.shape == A.shape and state.dtype == dtype and state.blocksize == blocksize

    out = F.dequantize_4bit(packed, state)
    expected = dequantize_4bit_ref(expected_packed, expected_absmax, blocksize, quant_type, A.shape, dtype)
    assert out.shape == A.shape and out.dtype == dtype
    assert torch.equal(out.cpu(), expected)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_round_trip_error_within_bitsandbytes_bounds(quant_type, blocksize):
    A = torch.randn(1024, 1024)
    packed, state = F.quantize_4bit(A, blocksize=blocksize, quant_type=quant_type)
    error = (A - F.dequantize_4bit(packed, state)).abs().mean().item()
    assert error < BNB_MEAN_ABS_ERROR[(quant_type, blocksize)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("blocksize", [32, 64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_double_quantization(device, quant_type, blocksize, dtype):
    A = torch.randn(1024, 1024, dtype=dtype, device=device)
    packed, state = F.quantize_4bit(A, blocksize=blocksize, quant_type=quant_type, compress_statistics=True)
    plain_packed, plain_state = F.quantize_4bit(A, blocksize=blocksize, quant_type=quant_type)
    assert torch.equal(packed, plain_packed)  # the codes do not depend on how absmax is stored
    assert state.nested and state.absmax.dtype == torch.uint8 and state.state2.blocksize == 256
    assert state.absmax.shape == plain_state.absmax.shape
    # the decoded absmax is close to the exact one (8-bit dynamic map, relative error of a few percent at most)
    decoded = state.get_absmax()
    assert torch.allclose(decoded, plain_state.absmax, rtol=0.05, atol=1e-3)
    error = (A.float() - F.dequantize_4bit(packed, state).float()).abs().mean().item()
    assert error < DOUBLE_QUANT_MEAN_ABS_ERROR


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("storage", [torch.uint8, torch.int8, torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("numel", [1, 7, 64, 130, 4096])
def test_quant_storage_is_a_view_of_the_same_bytes(device, storage, numel):
    A = torch.randn(numel, device=device)
    packed, state = F.quantize_4bit(A, quant_storage=storage)
    reference, _ = F.quantize_4bit(A)
    itemsize = storage.itemsize
    assert packed.dtype == storage and packed.shape == (-(-((numel + 1) // 2) // itemsize), 1)
    raw = packed.view(-1).view(torch.uint8)
    assert torch.equal(raw[: reference.numel()], reference.view(-1))
    assert not raw[reference.numel():].any()  # padding bytes are zero
    assert torch.equal(F.dequantize_4bit(packed, state), F.dequantize_4bit(reference, state))


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_input_matches_contiguous(device):
    base = torch.randn(96, 130, device=device, dtype=torch.bfloat16)
    views = [base.t(), base[:, ::2], base.as_strided((50, 64), (130, 2), storage_offset=7)]
    for view in views:
        assert not view.is_contiguous()
        packed, state = F.quantize_4bit(view)
        expected_packed, expected_state = F.quantize_4bit(view.contiguous())
        assert torch.equal(packed, expected_packed) and torch.equal(state.absmax, expected_state.absmax)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_out_argument(device, dtype):
    A = torch.randn(5, 77, dtype=dtype, device=device)
    packed, state = F.quantize_4bit(A, blocksize=32, quant_type="nf4")
    out = torch.empty_like(A)
    result = F.dequantize_4bit(packed, state, out=out)
    assert result is out
    assert torch.equal(out, F.dequantize_4bit(packed, state))
    # bitsandbytes' stateless form: absmax and out say everything
    out2 = torch.empty_like(A)
    F.dequantize_4bit(packed, absmax=state.absmax, out=out2, blocksize=32, quant_type="nf4")
    assert torch.equal(out2, out)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_inf_poison_only_their_block(device, quant_type, dtype, bad):
    A = torch.randn(5 * 64 + 17, dtype=dtype)
    clean_packed, clean_state = F.quantize_4bit(A.to(device), quant_type=quant_type)
    A[2 * 64 + 5] = bad
    A[5 * 64 + 3] = bad  # the partial last block
    packed, state = F.quantize_4bit(A.to(device), quant_type=quant_type)
    out = F.dequantize_4bit(packed, state).cpu()
    clean = F.dequantize_4bit(clean_packed, clean_state).cpu()
    poisoned = torch.zeros_like(A, dtype=torch.bool)
    poisoned[2 * 64 : 3 * 64] = True
    poisoned[5 * 64 :] = True
    assert torch.isnan(out[poisoned]).all()
    assert torch.equal(out[~poisoned], clean[~poisoned])
    assert torch.isnan(state.absmax[[2, 5]].cpu()).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_zero_blocks_give_exact_zeros(device, quant_type):
    A = torch.randn(4 * 64 + 9)
    A[64:128] = 0
    A[256:] = 0  # the tail block
    packed, state = F.quantize_4bit(A.to(device), quant_type=quant_type)
    out = F.dequantize_4bit(packed, state).cpu()
    assert not torch.isnan(out).any()
    assert (out[64:128] == 0).all() and (out[256:] == 0).all()
    codes = unpack_4bit_ref(packed.cpu(), A.numel())
    zero_code = 0b0111 if quant_type == "nf4" else 0
    assert (codes[64:128] == zero_code).all()
    all_zero, zero_state = F.quantize_4bit(torch.zeros(100, device=device), quant_type=quant_type)
    assert (F.dequantize_4bit(all_zero, zero_state) == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_subnormal_and_extreme_blocks(device, quant_type):
    # no flush-to-zero: fp32 subnormal blocks and blocks near FLT_MAX round-trip within the format's error
    finfo = torch.finfo(torch.float32)
    base = torch.rand(3 * 64) * 2 - 1
    base[::64] = 1.0  # every block reaches its absmax exactly
    for scale in (1e-40, finfo.tiny, finfo.max):
        A = base * scale
        packed, state = F.quantize_4bit(A.to(device), quant_type=quant_type)
        out = F.dequantize_4bit(packed, state).cpu()
        assert torch.isfinite(out).all()
        expected_unit = F.dequantize_4bit(*F.quantize_4bit(base, quant_type=quant_type))
        tolerance = 1e-6 if scale != 1e-40 else 1e-3  # a subnormal keeps fewer significant bits
        assert torch.allclose(out / scale, expected_unit, atol=tolerance, rtol=0)
    half = torch.tensor([65504.0, -65504.0, 1.0, 0.0], dtype=torch.float16)
    packed, state = F.quantize_4bit(half.to(device), blocksize=32, quant_type=quant_type)
    out = F.dequantize_4bit(packed, state).cpu()
    assert torch.isfinite(out).all() and out[0] == 65504 and out[1] == -65504


@pytest.mark.parametrize("device", DEVICES)
def test_threshold_ties_go_to_the_lower_code(device):
    # a block with absmax exactly 1 makes the scaled value equal the input
    from reference import nf4_thresholds_ref

    thresholds = nf4_thresholds_ref()
    above = torch.nextafter(thresholds, torch.full_like(thresholds, 2.0))
    A = torch.cat([torch.tensor([1.0]), thresholds, above])
    packed, _ = F.quantize_4bit(A.to(device), blocksize=32, quant_type="nf4")
    codes = unpack_4bit_ref(packed.cpu(), A.numel())
    assert codes[0] == 15
    assert torch.equal(codes[1:16], torch.arange(15))  # at a threshold: the lower code
    assert torch.equal(codes[16:31], torch.arange(1, 16))  # one ulp above: the upper code


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic(device):
    A = torch.randn(513, 77, device=device, dtype=torch.bfloat16)
    first = F.quantize_4bit(A, compress_statistics=True)
    for _ in range(5):
        again = F.quantize_4bit(A, compress_statistics=True)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1].absmax, again[1].absmax)
        assert torch.equal(F.dequantize_4bit(*first), F.dequantize_4bit(*again))


def test_nf4_fp4_conveniences():
    A = torch.randn(300)
    packed, state = bnbx.quantize_nf4(A)
    assert state.quant_type == "nf4"
    assert torch.equal(bnbx.dequantize_nf4(packed, state), F.dequantize_4bit(packed, state))
    packed, state = bnbx.quantize_fp4(A)
    assert state.quant_type == "fp4"
    assert torch.equal(bnbx.dequantize_fp4(packed, state), F.dequantize_4bit(packed, state))
    with pytest.raises(ValueError, match="holds fp4 codes"):
        bnbx.dequantize_nf4(packed, state)


def test_more_than_2_to_the_31_elements():
    # 64-bit indexing end to end (bitsandbytes#1782). 2^31 is a multiple of 64, so the last 65 elements form
    # one full block and a partial block of one, exactly as they do when quantized on their own.
    n = 2**31 + 65
    A = torch.full((n,), 0.5, dtype=torch.float16)
    A[-65:] = torch.arange(65, dtype=torch.float16) - 32
    tail = A[-65:].clone()
    packed, state = F.quantize_4bit(A, blocksize=64)
    del A
    assert packed.shape == ((n + 1) // 2, 1) and state.absmax.shape == (-(-n // 64),)
    tail_packed, tail_state = F.quantize_4bit(tail, blocksize=64)
    assert torch.equal(state.absmax[-2:], tail_state.absmax)
    assert torch.equal(packed[-33:], tail_packed)
    out = F.dequantize_4bit(packed, state)
    assert torch.equal(out[-65:], F.dequantize_4bit(tail_packed, tail_state))
    assert out[0] == 0.5 and out[-1] == 32


def test_concurrent_calls_are_bit_identical():
    from concurrent.futures import ThreadPoolExecutor

    A = torch.randn(257, 129, dtype=torch.bfloat16)
    expected_packed, expected_state = F.quantize_4bit(A, compress_statistics=True)
    expected_out = F.dequantize_4bit(expected_packed, expected_state)

    def work(_):
        for _ in range(20):
            packed, state = F.quantize_4bit(A, compress_statistics=True)
            out = F.dequantize_4bit(packed, state)
            if not (torch.equal(packed, expected_packed) and torch.equal(out, expected_out)):
                return False
        return True

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert all(pool.map(work, range(8)))
