"""Property tests (hypothesis): random shapes, strides, dtypes, blocksizes and injected special values."""

from __future__ import annotations

import pytest
import torch

from bnbx import functional as F
from reference import code_table_ref, dequantize_4bit_ref, quantize_4bit_ref

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is not installed")
from hypothesis import given, settings, strategies as st  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SPECIALS = [0.0, -0.0, float("nan"), float("inf"), float("-inf"), 1e-40, 3.0e38, 65504.0]


@st.composite
def tensors(draw):
    shape = tuple(draw(st.lists(st.integers(0, 40), min_size=0, max_size=3)))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    A = (torch.randn(shape, generator=generator) * scale)
    flat = A.view(-1)
    for _ in range(draw(st.integers(0, 3))):
        if flat.numel():
            flat[draw(st.integers(0, flat.numel() - 1))] = draw(st.sampled_from(SPECIALS))
    A = A.to(dtype)
    if A.dim() == 2 and draw(st.booleans()):
        A = A.t()  # a non-contiguous view
    return A


@settings(max_examples=300, deadline=None)
@given(A=tensors(), blocksize=st.sampled_from([32, 64, 128, 4096]), quant_type=st.sampled_from(["nf4", "fp4"]))
def test_quantize_4bit_properties(A, blocksize, quant_type):
    packed, state = F.quantize_4bit(A, blocksize=blocksize, quant_type=quant_type)
    expected_packed, expected_absmax = quantize_4bit_ref(A, blocksize, quant_type)
    assert torch.equal(packed.view(-1), expected_packed)
    assert torch.equal(torch.isnan(state.absmax), torch.isnan(expected_absmax))
    finite = ~torch.isnan(expected_absmax)
    assert torch.equal(state.absmax[finite], expected_absmax[finite])

    out = F.dequantize_4bit(packed, state)
    assert out.shape == A.shape and out.dtype == A.dtype
    reference = dequantize_4bit_ref(expected_packed, expected_absmax, blocksize, quant_type, A.shape, A.dtype)
    assert torch.equal(torch.isnan(out), torch.isnan(reference))
    assert torch.equal(out[~torch.isnan(out)], reference[~torch.isnan(reference)])

    # every finite block: error at most half the largest gap between codes, times absmax (plus output rounding)
    table = code_table_ref(quant_type).sort().values
    half_gap = (table[1:] - table[:-1]).max().item() / 2
    blocks_absmax = state.absmax.repeat_interleave(blocksize)[: A.numel()]
    error = (out.float() - A.float()).reshape(-1).abs()
    bound = blocks_absmax * half_gap * (1 + 2 ** -7) + blocks_absmax * 2**-7
    ok = torch.isnan(blocks_absmax) | (error <= bound)
    assert ok.all()

    # idempotent: a dequantized tensor quantizes to itself (compared as values: FP4's -0 code decodes to
    # -0.0, which quantizes to the +0 code since -0.0 < 0 is false)
    if torch.isfinite(state.absmax).all() and A.dtype == torch.float32:
        again = F.dequantize_4bit(*F.quantize_4bit(out, blocksize=blocksize, quant_type=quant_type))
        assert torch.equal(again, out)


@settings(max_examples=200, deadline=None)
@given(A=tensors(), symmetric=st.booleans(), granularity=st.sampled_from(["tensor", "channel", "token"]))
def test_int8_round_trip_properties(A, symmetric, granularity):
    if granularity != "tensor" and A.dim() == 0:
        return
    q, state = F.quantize_int8(A, granularity, symmetric=symmetric)
    out = F.dequantize_int8(q, state)
    assert out.shape == A.shape and q.dtype == torch.int8
    if granularity == "tensor":
        scale = state.scale.expand(A.shape) if A.dim() else state.scale
    elif granularity == "channel":
        scale = state.scale.reshape((-1,) + (1,) * (A.dim() - 1)).expand(A.shape)
    else:
        scale = state.scale.unsqueeze(-1).expand(A.shape)
    finite = torch.isfinite(scale)
    error = (out.float() - A.float()).abs()
    assert (error[finite] <= scale[finite] * 0.5 * (1 + 1e-5) + A.float().abs()[finite] * 2**-7).all()
    assert torch.isnan(out[~finite]).all()
