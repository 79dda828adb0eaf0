"""Byte compatibility with bitsandbytes (installed from PyPI; its CPU path runs here)."""

from __future__ import annotations

import pytest
import torch

from bnbx import QuantState
from bnbx import functional as F
from conftest import DTYPES, dtype_id
from reference import dequantize_4bit_ref, fp4_pivots_ref

bnb_functional = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is not installed")

SHAPES = [(1,), (63,), (4097,), (64, 96), (33, 130)]


def rows_hold_whole_blocks(A: torch.Tensor, blocksize: int) -> bool:
    # bitsandbytes 0.50.2's native CPU dequantize_4bit assumes every block lies inside one row: for a 2-D
    # tensor whose last dimension is not a multiple of the blocksize (and numel % 16 == 0) it returns wrong
    # values (e.g. (64, 96) at blocksize 64: 5413 of 6144 differ). bnbx follows the format (blocks over the
    # flattened tensor), so it is compared with bitsandbytes' dequantize only where that holds.
    return A.dim() == 1 or A.shape[-1] % blocksize == 0


@pytest.mark.parametrize("blocksize", [32, 64, 128, 256, 1024, 4096])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_nf4_bytes_and_absmax_equal_bitsandbytes(blocksize, dtype, shape):
    A = torch.randn(shape, dtype=dtype)
    packed, state = F.quantize_4bit(A, blocksize=blocksize, quant_type="nf4")
    bnb_packed, bnb_state = bnb_functional.quantize_4bit(A, blocksize=blocksize, quant_type="nf4")
    assert packed.shape == bnb_packed.shape
    assert torch.equal(packed, bnb_packed)
    assert torch.equal(state.absmax, bnb_state.absmax)
    ours = F.dequantize_4bit(packed, state)
    assert torch.equal(ours, dequantize_4bit_ref(bnb_packed, bnb_state.absmax, blocksize, "nf4", A.shape, dtype))
    if rows_hold_whole_blocks(A, blocksize):
        assert torch.equal(ours, bnb_functional.dequantize_4bit(bnb_packed, bnb_state))


@pytest.mark.parametrize("blocksize", [32, 64, 256])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_fp4_decodes_to_the_same_values(blocksize, dtype, shape):
    # bnbx rounds FP4 as bitsandbytes' CUDA kernel does (on |x|, its decimal pivots, sign bit when x < 0).
    # bitsandbytes' CPU path bucketizes the signed value on exact fp32 midpoints instead, so the two differ
    # only (a) for +0/-0 (equal when decoded), (b) at exact ties of negative values (CPU rounds away from
    # zero, CUDA towards), (c) in the windows of up to 3.6e-7 between a pivot and the exact midpoint.
    A = torch.randn(shape, dtype=dtype)
    packed, state = F.quantize_4bit(A, blocksize=blocksize, quant_type="fp4")
    bnb_packed, bnb_state = bnb_functional.quantize_4bit(A, blocksize=blocksize, quant_type="fp4")
    assert torch.equal(state.absmax, bnb_state.absmax)
    ours = F.dequantize_4bit(packed, state)
    theirs = dequantize_4bit_ref(bnb_packed, bnb_state.absmax, blocksize, "fp4", A.shape, dtype)
    differ = (ours != theirs).reshape(-1)
    scaled = A.reshape(-1).float() * (1.0 / state.absmax).repeat_interleave(blocksize)[: A.numel()]
    distance_to_pivot = (scaled.abs()[:, None] - fp4_pivots_ref()).abs().amin(dim=1)
    assert (distance_to_pivot[differ] <= 4e-7).all()
    assert differ.float().mean() < 0.01
    assert (F.dequantize_4bit(bnb_packed, state) == theirs).all()  # bnbx decodes bitsandbytes' bytes exactly
    if rows_hold_whole_blocks(A, blocksize):
        assert (theirs == bnb_functional.dequantize_4bit(bnb_packed, bnb_state)).all()


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_state_dicts_load_both_ways(quant_type, nested):
    A = torch.randn(128, 192, dtype=torch.bfloat16)  # rows of whole blocks (see rows_hold_whole_blocks)
    # bitsandbytes -> bnbx
    bnb_packed, bnb_state = bnb_functional.quantize_4bit(A, quant_type=quant_type, compress_statistics=nested)
    items = {f"weight.{k}": v for k, v in bnb_state.as_dict(packed=True).items()}
    loaded = QuantState.from_dict(items)
    expected = bnb_functional.dequantize_4bit(bnb_packed, bnb_state)
    assert torch.equal(F.dequantize_4bit(bnb_packed, loaded), expected)
    # bnbx -> bitsandbytes
    packed, state = F.quantize_4bit(A, quant_type=quant_type, compress_statistics=nested)
    items = {f"weight.{k}": v for k, v in state.as_dict(packed=True).items()}
    their_state = bnb_functional.QuantState.from_dict(items, device="cpu")
    assert torch.equal(bnb_functional.dequantize_4bit(packed, their_state), F.dequantize_4bit(packed, state))
    # the JSON blob is byte-identical when the values agree
    key = f"quant_state.bitsandbytes__{quant_type}"
    if not nested:
        assert torch.equal(state.as_dict(packed=True)[key], bnb_state.as_dict(packed=True)[key])


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_blockwise_8bit_dequantize_matches(dtype):
    A = torch.randn(5000, dtype=dtype)
    codes, state = F.quantize_blockwise(A, blocksize=256)
    their = bnb_functional.dequantize_blockwise(codes, absmax=state.absmax, code=state.code, blocksize=256)
    assert torch.equal(F.dequantize_blockwise(codes, state).float(), their.float().to(dtype).float())
