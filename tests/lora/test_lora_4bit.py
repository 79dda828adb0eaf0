"""bnbx.lora over bnbx.nn.Linear4bit bases: forward, exact merge/unmerge (packed bytes untouched), dense
merge rounded once, re-quantization with its error, compile."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bnbx
import bnbx.lora as lora
from bnbx.lora._base import dense_weight
from reference_lora import assert_forward_within


def quantized(in_f=96, out_f=80, bias=True, dtype=torch.bfloat16, storage=torch.uint8, dq=True, qtype="nf4"):
    dense = nn.Linear(in_f, out_f, bias=bias, dtype=dtype)
    return bnbx.nn.Linear4bit.from_linear(dense, compute_dtype=dtype, quant_type=qtype, compress_statistics=dq,
                                          quant_storage=storage)


def adapted(base, **kwargs):
    layer = lora.LoraLinear(base, **kwargs)
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.05)
    return layer


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same_bits(a, b):
    """Equal bytes (packed codes viewed as bf16 may hold NaN patterns, which torch.equal calls unequal)."""
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def fp32_reference(layer, x):
    """x W^T + b with W decoded in fp32, plus the adapter in fp32."""
    base = layer.base_layer
    w = bnbx.dequantize_4bit(base.weight.data, base.weight.quant_state).float()
    y = x.float() @ w.T + (0 if base.bias is None else base.bias.float())
    return y + (x.float() @ layer.lora_A.weight.float().T @ layer.lora_B.weight.float().T) * layer.scaling


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16])
def test_forward(dtype, storage):
    layer = adapted(quantized(dtype=dtype, storage=storage), r=4, lora_alpha=8)
    assert layer.lora_A.weight.dtype == dtype  # the compute dtype
    x = torch.randn(3, 5, 96, dtype=dtype)
    y = layer(x)
    assert y.dtype == dtype
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=0.03, atol=0.03)
    torch.testing.assert_close(y.float(), fp32_reference(layer, x), **tol)
    # the adapter's update joins the base's output before the one rounding to dtype
    assert_forward_within(y, x, layer.base_layer(x), layer.lora_A.weight, layer.lora_B.weight, layer.scaling)


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16])
def test_merge_unmerge_keeps_packed_base(storage):
    layer = adapted(quantized(storage=storage), r=8, lora_alpha=16)
    before = snapshot(layer)
    x = torch.randn(7, 96, dtype=torch.bfloat16)
    y = layer(x)
    layer.merge()
    assert layer.merged and layer.merged_weight.dtype == torch.bfloat16
    expected = (dense_weight(layer.base_layer) + layer.delta_weight()).to(torch.bfloat16)
    assert torch.equal(layer.merged_weight, expected)
    torch.testing.assert_close(layer(x), y, rtol=0.03, atol=0.03)
    after_merge = snapshot(layer)
    layer.unmerge()
    for state in (after_merge, snapshot(layer)):
        assert state.keys() == before.keys()
        for key in before:  # packed codes, absmax, nested statistics, bias, adapter: bit for bit
            assert same_bits(before[key], state[key]), key
    assert torch.equal(layer(x), y)


def test_merge_and_unload_dense_rounds_once():
    model = nn.Sequential(adapted(quantized(), r=4), nn.GELU(), quantized(80, 24))
    first, untouched = model[0], model[2]
    exact = dense_weight(first.base_layer) + first.delta_weight()
    untouched_dense = dense_weight(untouched, torch.bfloat16)
    # what dequantize-then-add in bf16 (bitsandbytes/peft's merge, before re-quantizing) would give
    twice = first.base_layer.dequantize(torch.bfloat16) + first.delta_weight(torch.bfloat16)
    x = torch.randn(4, 96)
    lora.merge_and_unload(model, dtype=torch.bfloat16)
    assert type(model[0]) is nn.Linear and type(model[2]) is nn.Linear  # a dense model
    assert torch.equal(model[0].weight, exact.to(torch.bfloat16))
    assert torch.equal(model[2].weight, untouched_dense)
    assert not torch.equal(model[0].weight, twice)  # the double rounding differs (and is avoided)
    assert model(x.to(torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16])
def test_merge_and_unload_requantize(storage):
    base = quantized(storage=storage, dq=True, qtype="nf4")
    model = nn.Sequential(adapted(base, r=4, lora_alpha=8), nn.ReLU(), quantized(80, 24))
    untouched = snapshot(model[2])
    exact = dense_weight(base) + model[0].delta_weight()
    merged, errors = lora.merge_and_unload(model, requantize=True, return_errors=True)
    new = merged[0]
    assert isinstance(new, bnbx.nn.Linear4bit)
    w = new.weight
    assert (w.quant_type, w.blocksize, w.compress_statistics, w.quant_storage) == ("nf4", 64, True, storage)
    assert new.compute_dtype == torch.bfloat16 and w.quant_state.dtype == base.weight.quant_state.dtype
    # quantized once, from the exact fp32 sum
    packed, state = bnbx.quantize_4bit(exact, quant_type="nf4", compress_statistics=True, quant_storage=storage)
    assert same_bits(w.data, packed)
    assert torch.equal(new.bias, base.bias)
    diff = dense_weight(new) - exact
    assert set(errors) == {"0"}
    assert errors["0"].max_abs == pytest.approx(diff.abs().max().item())
    assert errors["0"].relative_rms == pytest.approx((diff.norm() / exact.norm()).item(), rel=1e-4)
    assert 0 < errors["0"].relative_rms < 0.2  # NF4's error, not garbage
    for key, value in snapshot(merged[2]).items():  # layers without an adapter keep their codes
        assert same_bits(value, untouched[key]), key


def test_only_adapter_gets_gradients():
    layer = adapted(quantized(dtype=torch.float32), r=4)
    packed = layer.base_layer.weight.data.clone()
    x = torch.randn(6, 96, requires_grad=True)
    layer(x).square().sum().backward()
    assert layer.base_layer.weight.grad is None
    assert layer.lora_A.weight.grad is not None and layer.lora_B.weight.grad is not None
    # gradients agree with the fp32 dequantized reference
    a = layer.lora_A.weight.detach().clone().requires_grad_()
    b = layer.lora_B.weight.detach().clone().requires_grad_()
    xr = x.detach().clone().requires_grad_()
    w = dense_weight(layer.base_layer)
    ref = xr @ w.T + layer.base_layer.bias.detach() + (xr @ a.T @ b.T) * layer.scaling
    ref.square().sum().backward()
    torch.testing.assert_close(layer.lora_A.weight.grad, a.grad, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(layer.lora_B.weight.grad, b.grad, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-3, atol=1e-3)
    assert same_bits(layer.base_layer.weight.data, packed)


def test_all_linear_finds_quantized_layers():
    model = nn.Sequential()
    model.add_module("q_proj", quantized())
    model.add_module("lm_head", nn.Linear(80, 10))
    assert lora.find_target_modules(model) == ["q_proj"]
    lora.add_lora(model)
    assert isinstance(model.q_proj, lora.LoraLinear) and isinstance(model.q_proj.base_layer, bnbx.nn.Linear4bit)
    assert "Linear4bit" in repr(model) and "r=8" in repr(model)
    trainable, total = lora.trainable_parameter_count(model)
    assert trainable == 8 * (96 + 80)
    assert total == 96 * 80 + 80 + trainable + 80 * 10 + 10  # the packed weight counted as 96*80 parameters


def test_compile_fullgraph():
    layer = adapted(quantized(dtype=torch.float32), r=4).eval()
    x = torch.randn(5, 96)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), layer(x))


def test_save_load_adapter_on_4bit_model(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(quantized(), nn.ReLU(), quantized(80, 24))
    copy = nn.Sequential(quantized(), nn.ReLU(), quantized(80, 24))
    copy.load_state_dict(model.state_dict())
    lora.add_lora(model, "all-linear", r=4)
    with torch.no_grad():
        for _, layer in lora.lora_layers(model):
            layer.lora_B.weight.normal_()
    lora.save_adapter(model, tmp_path / "a.safetensors")
    lora.load_adapter(copy, tmp_path / "a.safetensors")
    x = torch.randn(3, 96, dtype=torch.bfloat16)
    assert torch.equal(copy(x), model(x))
