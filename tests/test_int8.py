"""int8 absmax (symmetric) and zero-point (asymmetric) quantization per tensor, channel, token and group."""

from __future__ import annotations

import pytest
import torch

from bnbx import functional as F
from conftest import DEVICES, DTYPES, dtype_id
from reference import dequantize_int8_ref, quantize_int8_ref


def groups_of(A: torch.Tensor, granularity: str, axis: int, group_size: int) -> tuple[torch.Tensor, int]:
    """A laid out so every group is contiguous (as the docs define the groups), and the group length."""
    if granularity == "tensor":
        return A, max(A.numel(), 1)
    if granularity == "channel":
        moved = A.movedim(axis, 0).contiguous()
        return moved, max(moved[0].numel(), 1)
    if granularity == "token":
        return A, A.shape[-1]
    return A, group_size


CASES = [
    ("tensor", 0, 0, (37, 19)),
    ("channel", 0, 0, (37, 19)),
    ("channel", 1, 0, (37, 19)),
    ("channel", -1, 0, (4, 5, 33)),
    ("token", 0, 0, (4, 5, 33)),
    ("group", 0, 32, (7, 128)),
    ("group", 0, 3, (5, 9)),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("symmetric", [True, False], ids=["absmax", "zeropoint"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("granularity,axis,group_size,shape", CASES, ids=str)
def test_matches_reference(device, symmetric, dtype, granularity, axis, group_size, shape):
    A = (torch.randn(shape) * 4 + 1).to(dtype)
    q, state = F.quantize_int8(A.to(device), granularity, symmetric=symmetric, axis=axis, group_size=group_size)
    layout, size = groups_of(A, granularity, axis, group_size)
    layout_q, expected_scale, expected_zero_point = quantize_int8_ref(layout, size, symmetric)
    expected_q = layout_q.movedim(0, axis) if granularity == "channel" else layout_q
    assert q.shape == A.shape and q.dtype == torch.int8
    assert torch.equal(q.cpu(), expected_q)
    assert torch.equal(state.scale.reshape(-1).cpu(), expected_scale)
    assert torch.equal(state.zero_point.reshape(-1).cpu(), expected_zero_point)
    out = F.dequantize_int8(q, state)
    assert out.dtype == dtype and out.shape == A.shape
    expected = dequantize_int8_ref(layout_q, expected_scale, expected_zero_point, size, dtype)
    if granularity == "channel":
        expected = expected.movedim(0, axis)
    assert torch.equal(out.cpu(), expected)


@pytest.mark.parametrize("symmetric", [True, False], ids=["absmax", "zeropoint"])
def test_round_trip_error_is_at_most_half_a_step(symmetric):
    A = torch.randn(64, 256) * 3
    q, state = F.quantize_int8(A, "channel", symmetric=symmetric)
    error = (F.dequantize_int8(q, state) - A).abs()
    assert (error <= state.scale[:, None] * 0.5 + 1e-6).all()
    if symmetric:
        assert q.min() >= -127 and (state.zero_point == 0).all()
        # each channel's largest magnitude lands on +-127 exactly
        assert (q.abs().amax(dim=1) == 127).all()
    else:
        assert (q.amax(dim=1) == 127).all() or (q.amin(dim=1) == -128).all()


@pytest.mark.parametrize("stat_shape,granularity,kwargs", [((), "tensor", {}), ((4,), "channel", {}),
                                                            ((4,), "token", {}), ((4, 2), "group", {"group_size": 8})])
def test_statistics_shapes(stat_shape, granularity, kwargs):
    q, state = F.quantize_int8(torch.randn(4, 16), granularity, **kwargs)
    assert tuple(state.scale.shape) == stat_shape and tuple(state.zero_point.shape) == stat_shape


def test_nan_and_zero_groups():
    A = torch.randn(3, 8)
    A[0, 3] = float("nan")
    A[1] = 0
    for symmetric in (True, False):
        q, state = F.quantize_int8(A, "token", symmetric=symmetric)
        out = F.dequantize_int8(q, state)
        assert torch.isnan(out[0]).all()
        assert (out[1] == 0).all() and state.scale[1] == 0
        assert torch.isfinite(out[2]).all()


def test_empty_tensors():
    for granularity in ("tensor", "channel", "token"):
        q, state = F.quantize_int8(torch.empty(0, 5), granularity)
        assert q.shape == (0, 5)
        assert F.dequantize_int8(q, state).shape == (0, 5)


def test_bad_granularity_arguments():
    with pytest.raises(ValueError, match="multiple of group_size"):
        F.quantize_int8(torch.randn(4, 10), "group", group_size=4)
    with pytest.raises(ValueError, match="granularity must be"):
        F.quantize_int8(torch.randn(4, 10), "row")
    with pytest.raises(ValueError, match="axis 2 is out of range"):
        F.quantize_int8(torch.randn(4, 10), "channel", axis=2)


def test_fp16_output_saturates_instead_of_overflowing():
    # zero-point rounding rebuilds 65504 as (127 + 127) * 258.03 = 65539.6, past fp16's largest finite value
    A = torch.tensor([65504.0, -293.5], dtype=torch.float16)
    q, state = F.quantize_int8(A, "tensor", symmetric=False)
    out = F.dequantize_int8(q, state)
    assert torch.isfinite(out).all() and out[0] == 65504


# --- the rounding rule: q = round_half_even(x * (1 / scale)) + zero_point, as torch's fake-quantize ops --------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("symmetric", [True, False], ids=["absmax", "zeropoint"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_equals_torch_fake_quantize_per_channel(device, symmetric, dtype):
    # torch's fake_quantize_per_channel_affine computes x * (1 / scale) in fp32, rounds half to even, adds the
    # zero point, clamps, and returns (q - zero_point) * scale: the same bits as bnbx's quantize + dequantize
    A = (torch.randn(48, 333) * torch.rand(48, 1) * 10).to(dtype)
    q, state = F.quantize_int8(A.to(device), "channel", symmetric=symmetric, axis=0)
    scale, zero_point = state.scale.reshape(-1).cpu(), state.zero_point.reshape(-1).cpu()
    expected = torch.fake_quantize_per_channel_affine(A.float(), scale, zero_point, 0, -127 if symmetric else -128, 127)
    assert torch.equal((q.cpu().float() - zero_point[:, None].float()) * scale[:, None], expected)
    assert torch.equal(F.dequantize_int8(q, state, torch.float32).cpu(), expected)


@pytest.mark.parametrize("symmetric", [True, False], ids=["absmax", "zeropoint"])
def test_equals_torch_fake_quantize_per_tensor(symmetric):
    A = torch.randn(5000) * 7
    q, state = F.quantize_int8(A, "tensor", symmetric=symmetric)
    scale, zero_point = float(state.scale), int(state.zero_point)
    expected = torch.fake_quantize_per_tensor_affine(A, scale, zero_point, -127 if symmetric else -128, 127)
    assert torch.equal((q.float() - zero_point) * state.scale, expected)


def test_rule_is_the_reciprocal_of_the_scale_not_127_over_absmax():
    # absmax values for which fp32 1 / (absmax / 127) != 127 / absmax, and x on the .5 boundaries where the two
    # multipliers round to different codes: bnbx must follow the reciprocal (torch's rule; bitsandbytes'
    # LLM.int8() 127 / absmax rule is a separate op)
    absmax = torch.rand(4000) + 0.5
    reciprocal = 1.0 / (absmax / 127.0)
    direct = 127.0 / absmax
    absmax = absmax[reciprocal != direct][:200]
    assert absmax.numel() == 200  # about a quarter of fp32 values differ
    scale = absmax / 127.0
    k = torch.arange(-126, 126).float() + 0.5
    x = (k[None, :] * scale[:, None])
    x = torch.cat([x, x.nextafter(torch.tensor(1e9)), x.nextafter(torch.tensor(-1e9))], dim=1)
    x = torch.cat([absmax[:, None], x], dim=1)  # each row's absmax is exactly absmax
    q, state = F.quantize_int8(x, "token", symmetric=True)
    assert torch.equal(state.scale.reshape(-1), scale)
    by_reciprocal = torch.round(x * (1.0 / scale)[:, None]).clamp(-127, 127)
    by_direct = torch.round(x * (127.0 / absmax)[:, None]).clamp(-127, 127)
    assert torch.equal(q.float(), by_reciprocal)
    assert not torch.equal(q.float(), by_direct)
