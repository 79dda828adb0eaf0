"""bnbx.nn.weight_only: the stored codes are the functional ops' codes, forward is F.linear on the dequantized
weight, state_dict round trips exactly, bad input is refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import bnbx
from bnbx.nn import LinearAbsmax8, LinearBlockwise8, LinearZeroPoint8

from conftest import DTYPES, dtype_id


def _reference(cls, weight):
    if cls is LinearBlockwise8:
        codes, state = bnbx.quantize_blockwise(weight, blocksize=256)
        return codes, bnbx.dequantize_blockwise(codes, state)
    q, state = bnbx.quantize_int8(weight, "channel", symmetric=cls is LinearAbsmax8, axis=0)
    return q, bnbx.dequantize_int8(q, state)


@pytest.mark.parametrize("cls", [LinearAbsmax8, LinearZeroPoint8, LinearBlockwise8])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", [(7, 33), (64, 64), (300, 17)])
def test_matches_functional_ops(cls, dtype, shape):
    linear = torch.nn.Linear(shape[1], shape[0], bias=True).to(dtype)
    module = cls.from_linear(linear)
    codes, dense = _reference(cls, linear.weight.detach())
    assert torch.equal(module.weight, codes)
    assert module.dequantize().dtype == dtype and torch.equal(module.dequantize(), dense)
    x = torch.randn(3, 5, shape[1], dtype=dtype)
    torch.testing.assert_close(module(x), F.linear(x, dense, linear.bias), rtol=0, atol=0)
    assert module.weight.element_size() == 1 and not module.weight.requires_grad


@pytest.mark.parametrize("cls", [LinearAbsmax8, LinearZeroPoint8, LinearBlockwise8])
def test_state_dict_round_trip_and_errors(cls):
    module = cls.from_linear(torch.nn.Linear(40, 24))
    fresh = cls(40, 24)
    fresh.load_state_dict(module.state_dict())
    x = torch.randn(2, 40)
    assert torch.equal(fresh(x), module(x))
    assert f"method={cls.method}" in repr(module)
    with pytest.raises(ValueError, match="last dimension"):
        module(torch.randn(2, 39))
    with pytest.raises(TypeError, match="nn.Linear"):
        cls.from_linear(torch.nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match="in_features"):
        cls(0, 4)
    with pytest.raises(TypeError, match="dtype"):
        cls(4, 4, dtype=torch.int8)
