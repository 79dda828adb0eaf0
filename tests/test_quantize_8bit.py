"""8-bit blockwise quantization (the dynamic map used for double quantization) against the reference."""

from __future__ import annotations

import pytest
import torch

from bnbx import functional as F
from conftest import BLOCKSIZES, DEVICES, DTYPES, dtype_id
from reference import dequantize_blockwise_ref, quantize_blockwise_ref

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
