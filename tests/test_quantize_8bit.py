"""8-bit blockwise quantization (the dynamic map used for double quantization) against the reference."""

from __future__ import annotations

import pytest
import torch

from bnbx import functional as F
from conftest import BLOCKSIZES, DEVICES, DTYPES, dtype_id
from reference import dequantize_blockwise_ref, double_quantize_ref, quantize_blockwise_ref

SHAPES = [(1,), (255,), (256,), (257,), (4097,), (3, 129), (0,)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(device, blocksize, dtype, shape):
    A = torch.randn(shape, dtype=dtype)
    codes, state = F.quantize_blockwise(A.to(device), blocksize=blocksize)
    code = F.create_dynamic_map()
    expected_codes, expected_absmax = quantize_blockwise_ref(A, code, blocksize)
    assert codes.shape == A.shape and codes.dtype == torch.uint8
    assert torch.equal(codes.cpu(), expected_codes)
    assert torch.equal(state.absmax.cpu(), expected_absmax)
    out = F.dequantize_blockwise(codes, state)
    assert out.dtype == dtype
    assert torch.equal(out.cpu(), dequantize_blockwise_ref(expected_codes, expected_absmax, code, blocksize, dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_error_within_bitsandbytes_bounds(device):
    # bitsandbytes' test_dynamic_blockwise_quantization bounds for randn: abs < 0.011, rel < 0.018
    A = torch.randn(1024, 1024, device=device)
    out = F.dequantize_blockwise(*F.quantize_blockwise(A))
    error = (A - out).abs()
    assert error.mean().item() < 0.011
    assert (error / (A.abs() + 1e-8)).mean().item() < 0.018


@pytest.mark.parametrize("device", DEVICES)
def test_custom_code_and_nested(device):
    A = torch.randn(5000, device=device)
    linear = torch.linspace(-1, 1, 256, device=device)
    codes, state = F.quantize_blockwise(A, code=linear, blocksize=256)
    expected_codes, _ = quantize_blockwise_ref(A.cpu(), linear.cpu(), 256)
    assert torch.equal(codes.cpu(), expected_codes)
    nested_codes, nested_state = F.quantize_blockwise(A, blocksize=256, nested=True)
    assert nested_state.nested and nested_state.absmax.dtype == torch.uint8
    assert torch.allclose(F.dequantize_blockwise(nested_codes, nested_state), A, atol=0.05)


def test_unsorted_code_is_rejected():
    code = torch.linspace(-1, 1, 256).flip(0)
    with pytest.raises(ValueError, match="code must be sorted"):
        F.quantize_blockwise(torch.randn(300), code=code)


@pytest.mark.parametrize("device", DEVICES)
def test_nan_block_and_zero_block(device):
    A = torch.randn(4 * 64)
    A[70] = float("nan")
    A[128:192] = 0
    codes, state = F.quantize_blockwise(A.to(device), blocksize=64)
    out = F.dequantize_blockwise(codes, state).cpu()
    assert torch.isnan(out[64:128]).all()
    assert (out[128:192] == 0).all()
    assert torch.isfinite(out[:64]).all() and torch.isfinite(out[192:]).all()


def _ties_input() -> torch.Tensor:
    """Every fp32 midpoint of the dynamic map, the codes, and one ulp either side, in blocks whose absmax is 1."""
    code = F.create_dynamic_map()
    mids = (code[1:] + code[:-1]) * 0.5
    values = torch.cat([mids, code, mids.nextafter(torch.tensor(2.0)), mids.nextafter(torch.tensor(-2.0))])
    values = values[torch.randperm(values.numel())]
    values = torch.cat([values, torch.zeros((-values.numel()) % 255)]).reshape(-1, 255)
    return torch.cat([torch.ones(values.shape[0], 1), values], dim=1).reshape(-1)  # x * (1 / 1) == x


@pytest.mark.parametrize("device", DEVICES)
def test_midpoint_ties_follow_bitsandbytes_cuda_rule(device):
    A = _ties_input()
    code = F.create_dynamic_map()
    codes, _ = F.quantize_blockwise(A.to(device), blocksize=256)
    expected, _ = quantize_blockwise_ref(A, code, 256)
    assert torch.equal(codes.cpu(), expected)
    # an exact midpoint keeps the even neighbour of the two (bitsandbytes' CUDA search), where a nearest-code
    # rule with ties to the lower code (torch.bucketize) would take the odd one half of the time
    mids = (code[1:] + code[:-1]) * 0.5
    on_mid = (A[:, None] == mids[None, :]).any(dim=1)
    assert on_mid.sum() >= 200
    assert bool((codes.cpu()[on_mid].long() % 2 == 0).all())
    bucketized = torch.bucketize(A, mids, right=False).to(torch.uint8)
    assert not torch.equal(bucketized, expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_nested_absmax_bytes_follow_the_cuda_rule(device, dtype):
    # the nested absmax of compress_statistics=True: (absmax - mean) coded 8-bit in blocks of 256 by the rule
    A = torch.randn(300, 257, dtype=dtype)
    packed, state = F.quantize_4bit(A.to(device), blocksize=64, compress_statistics=True)
    _, plain = F.quantize_4bit(A, blocksize=64)
    expected_codes, expected_absmax2, offset = double_quantize_ref(plain.absmax, F.create_dynamic_map(), 256)
    assert torch.equal(state.offset.cpu(), offset)
    assert torch.equal(state.absmax.cpu(), expected_codes)
    assert torch.equal(state.state2.absmax.cpu(), expected_absmax2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("blocksize", [64, 256, 4096])
@pytest.mark.parametrize("kind", ["rand", "nan", "all_nan", "empty", "one", "large_offset"])
def test_double_quantize_matches_reference(device, blocksize, kind):
    n = {"empty": 0, "one": 1}.get(kind, 70001)
    absmax = torch.rand(n) * 3
    if kind == "nan":
        absmax[::997] = float("nan")
    elif kind == "all_nan":
        absmax[:] = float("nan")
    elif kind == "large_offset":
        absmax = absmax + 1e6
    code = F.create_dynamic_map()
    q, absmax2, offset = torch.ops.bnbx.double_quantize(absmax.to(device), code.to(device), blocksize)
    expected_q, expected_absmax2, expected_offset = double_quantize_ref(absmax, code, blocksize)
    assert offset.shape == () and offset.dtype == torch.float32
    assert torch.equal(offset.cpu(), expected_offset)
    assert torch.equal(q.cpu(), expected_q)
    assert torch.equal(absmax2.cpu().nan_to_num(-1.0), expected_absmax2.nan_to_num(-1.0))


def test_double_quantize_offset_does_not_depend_on_threads():
    absmax = torch.rand(1 << 20) * 5
    code = F.create_dynamic_map()
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.bnbx.double_quantize(absmax, code, 256)
        torch.set_num_threads(2)
        two = torch.ops.bnbx.double_quantize(absmax, code, 256)
    finally:
        torch.set_num_threads(previous)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


def test_double_quantize_bad_arguments():
    code = F.create_dynamic_map()
    with pytest.raises(TypeError, match="double_quantize: absmax must be float32, got float16"):
        torch.ops.bnbx.double_quantize(torch.rand(10, dtype=torch.float16), code, 256)
    with pytest.raises(ValueError, match="double_quantize: blocksize must be a power of two"):
        torch.ops.bnbx.double_quantize(torch.rand(10), code, 100)
    with pytest.raises(ValueError, match="double_quantize: code must hold 256 values"):
        torch.ops.bnbx.double_quantize(torch.rand(10), code[:10], 256)
