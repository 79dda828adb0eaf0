"""bnbx.nn.Linear4bit: bitsandbytes' constructor and state_dict, quantize once, no float casts, autograd, compile."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from torch import nn

import bnbx
from bnbx import functional as F
from bnbx.nn import Linear4bit, LinearFP4, LinearNF4, Params4bit
from conftest import DTYPES, dtype_id

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")


def _bnb_layer(K: int, N: int, quant_type: str, nested: bool, dtype=torch.bfloat16) -> nn.Module:
    dense = nn.Linear(K, N).to(dtype)
    layer = bnb.nn.Linear4bit(K, N, compute_dtype=dtype, compress_statistics=nested, quant_type=quant_type)
    layer.load_state_dict(dense.state_dict())
    return layer.to("cpu")  # bitsandbytes quantizes here


def test_constructor_signature_is_bitsandbytes():
    ours = inspect.signature(Linear4bit.__init__).parameters
    theirs = inspect.signature(bnb.nn.Linear4bit.__init__).parameters
    shared = list(ours)[: len(theirs)]
    assert shared == list(theirs)  # same names in the same order; bnbx appends blocksize
    for name in theirs:
        assert ours[name].default == theirs[name].default, name
    for cls in (LinearNF4, LinearFP4):
        theirs = inspect.signature(getattr(bnb.nn, cls.__name__).__init__).parameters
        assert list(inspect.signature(cls.__init__).parameters)[: len(theirs)] == list(theirs)
    assert LinearNF4(64, 8).weight.quant_type == "nf4" and LinearFP4(64, 8).weight.quant_type == "fp4"


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_bitsandbytes_state_dict_loads_bit_exactly(quant_type, nested):
    theirs = _bnb_layer(128, 48, quant_type, nested)
    state_dict = theirs.state_dict()
    ours = Linear4bit(128, 48, compute_dtype=torch.bfloat16, quant_type=quant_type, compress_statistics=nested)
    ours.load_state_dict(state_dict)
    assert torch.equal(ours.weight.data, theirs.weight.data)
    assert ours.weight.bnb_quantized and ours.weight.quant_state.nested == nested
    expected = bnb.functional.dequantize_4bit(theirs.weight.data, theirs.weight.quant_state)
    assert torch.equal(ours.dequantize(), expected)
    # and back: bnbx's state_dict has bitsandbytes' keys and values
    again = ours.state_dict()
    assert set(again) == set(state_dict)
    for key, value in state_dict.items():
        assert torch.equal(again[key], value), key


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_bnbx_state_dict_loads_into_bitsandbytes(quant_type, nested):
    ours = Linear4bit.from_linear(nn.Linear(256, 40).bfloat16(), compute_dtype=torch.bfloat16,
                                  quant_type=quant_type, compress_statistics=nested)
    state_dict = ours.state_dict()
    stats = {k[len("weight."):]: v for k, v in state_dict.items() if k.startswith("weight.")}
    weight = bnb.nn.Params4bit.from_prequantized(state_dict["weight"], stats, device="cpu")
    assert torch.equal(bnb.functional.dequantize_4bit(weight.data, weight.quant_state), ours.dequantize())
    # a bitsandbytes layer holding that weight computes what ours does (training mode: dequantize + F.linear)
    theirs = bnb.nn.Linear4bit(256, 40, compute_dtype=torch.bfloat16, quant_type=quant_type)
    theirs.weight = weight
    theirs.bias = nn.Parameter(state_dict["bias"].clone())
    x = torch.randn(5, 256, dtype=torch.bfloat16)
    reference = nn.functional.linear(x.float(), ours.dequantize().float(), ours.bias.float())
    err_ours = (ours(x).float() - reference).abs().max()
    err_theirs = (theirs.train()(x).float() - reference).abs().max()
    assert err_ours <= 2 * err_theirs + 0.02


def test_state_dict_round_trip_and_strict_keys():
    ours = Linear4bit.from_linear(nn.Linear(96, 30), compress_statistics=True)
    fresh = Linear4bit(96, 30, quant_type="nf4")
    result = fresh.load_state_dict(ours.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(fresh.weight.data, ours.weight.data) and torch.equal(fresh.dequantize(), ours.dequantize())
    x = torch.randn(4, 96)
    assert torch.equal(fresh(x), ours(x))
    # loading into a layer built on the meta device (as transformers does) works too
    meta = Linear4bit(96, 30, quant_type="nf4", device="meta")
    meta.load_state_dict(ours.state_dict(), assign=True)
    assert torch.equal(meta(x), ours(x))


def test_quantizes_once():
    dense = nn.Linear(64, 16)
    layer = Linear4bit(64, 16, quant_type="nf4")
    layer.load_state_dict(dense.state_dict())  # a float state_dict: quantized on load
    packed = layer.weight.data.clone()
    state = layer.weight.quant_state
    layer.to("cpu")
    layer.cpu()
    layer.weight.to("cpu")
    assert torch.equal(layer.weight.data, packed) and layer.weight.quant_state is state
    expected, _ = F.quantize_4bit(dense.weight.detach(), quant_type="nf4", compress_statistics=True)
    assert torch.equal(packed, expected)


def test_lazy_quantization_on_move_like_bitsandbytes():
    layer = Linear4bit(64, 16, quant_type="nf4")
    assert not layer.weight.bnb_quantized and layer.weight.dtype == torch.float32
    dense = layer.weight.data.clone()
    layer.to("cpu")
    assert layer.weight.bnb_quantized and layer.weight.dtype == torch.uint8
    expected, _ = F.quantize_4bit(dense, quant_type="nf4", compress_statistics=True)
    assert torch.equal(layer.weight.data, expected) and layer.quant_state is layer.weight.quant_state


def test_float_casts_are_refused():
    layer = Linear4bit.from_linear(nn.Linear(64, 8))
    for cast in (lambda w: w.to(torch.float16), lambda w: w.half(), lambda w: w.float(), lambda w: w.bfloat16(),
                 lambda w: w.to("cpu", torch.bfloat16)):
        with pytest.raises(TypeError, match="cannot cast a packed 4-bit weight"):
            cast(layer.weight)
    # module-level casts skip integer storage and cast the bias, as nn.Module does
    layer.to(torch.bfloat16)
    assert layer.weight.dtype == torch.uint8 and layer.bias.dtype == torch.bfloat16
    assert layer(torch.randn(2, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16
    # with float storage (FSDP) the codes look like floats: a module cast to another dtype must refuse
    fsdp = Linear4bit.from_linear(nn.Linear(64, 8), quant_storage=torch.bfloat16)
    fsdp.to(torch.bfloat16)  # the same dtype: nothing to do
    with pytest.raises(TypeError, match="cannot cast a packed 4-bit weight"):
        fsdp.half()
    with pytest.raises(TypeError, match="cannot cast a packed 4-bit weight"):
        fsdp.to(torch.float32)


def test_input_feature_mismatch():
    layer = Linear4bit.from_linear(nn.Linear(64, 8))
    with pytest.raises(ValueError, match=r"last dimension must equal in_features \(64\)"):
        layer(torch.randn(3, 65))
    with pytest.raises(ValueError, match=r"in_features \(64\)"):
        bnbx.matmul_4bit(torch.randn(3, 32), layer.weight, layer.weight.quant_state)


def test_quant_state_that_does_not_fit_the_weight():
    saved = Linear4bit.from_linear(nn.Linear(64, 32)).state_dict()
    with pytest.raises(ValueError, match=r"describes a weight of shape \[32, 64\].*\[64, 32\]"):
        Linear4bit(32, 64, quant_type="nf4").load_state_dict(saved)
    truncated = dict(saved)
    truncated["weight"] = saved["weight"][:-1]
    with pytest.raises(ValueError, match="holds 1023 bytes of packed codes"):
        Linear4bit(64, 32, quant_type="nf4").load_state_dict(truncated)
    short = dict(saved)
    short["weight.absmax"] = saved["weight.absmax"][:-1]
    with pytest.raises(ValueError, match="absmax must hold 32 values"):
        Linear4bit(64, 32, quant_type="nf4").load_state_dict(short)
    wrong_dense = {"weight": torch.randn(64, 32), "bias": torch.randn(32)}
    with pytest.raises(ValueError, match=r"weight has shape \[64, 32\], expected \[32, 64\]"):
        Linear4bit(64, 32).load_state_dict(wrong_dense)


def test_wrong_dtypes():
    layer = Linear4bit.from_linear(nn.Linear(64, 8))
    with pytest.raises(TypeError, match="A must be float32, float16 or bfloat16, got int64"):
        layer(torch.ones(2, 64, dtype=torch.long))
    with pytest.raises(TypeError, match="compute_dtype must be None, float32, float16 or bfloat16"):
        Linear4bit(64, 8, compute_dtype=torch.float64)
    with pytest.raises(TypeError, match="quant_state must be a QuantState"):
        bnbx.matmul_4bit(torch.randn(2, 64), layer.weight, None)
    with pytest.raises(TypeError, match="gemm_4bit: absmax must be float32, got float16"):
        state = layer.weight.quant_state
        torch.ops.bnbx.gemm_4bit(torch.randn(2, 64), layer.weight, state.get_absmax().half(), 64, "nf4", [8, 64])
    with pytest.raises(ValueError, match=r"gemm_4bit: bias must have shape \[8\]"):
        torch.ops.bnbx.gemm_4bit(torch.randn(2, 64), layer.weight, state.get_absmax(), 64, "nf4", [8, 64],
                                 torch.randn(9))
    with pytest.raises(ValueError, match="quant_type must be 'nf4' or 'fp4'"):
        Params4bit(torch.randn(4, 4), quant_type="int4")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_forward_matches_dequantize_then_linear(dtype):
    dense = nn.Linear(192, 24).to(dtype)
    layer = Linear4bit.from_linear(dense, compute_dtype=dtype)
    x = torch.randn(2, 7, 192, dtype=dtype)
    reference = nn.functional.linear(x.double(), layer.dequantize().double(), dense.bias.double())
    baseline = nn.functional.linear(x, layer.dequantize(dtype), dense.bias)
    out = layer(x)
    assert out.shape == (2, 7, 24) and out.dtype == dtype
    assert (out.double() - reference).abs().max() <= 2 * (baseline.double() - reference).abs().max() + 1e-3


def test_compute_dtype_casts_and_returns_input_dtype():
    layer = Linear4bit.from_linear(nn.Linear(64, 8), compute_dtype=torch.bfloat16)
    x = torch.randn(3, 64)
    out = layer(x)
    assert out.dtype == torch.float32
    expected = bnbx.matmul_4bit(x.bfloat16(), layer.weight, layer.weight.quant_state, bias=layer.bias).float()
    assert torch.equal(out, expected)


def test_training_gradients_reach_input_and_bias_only():
    layer = Linear4bit.from_linear(nn.Linear(128, 16), compute_dtype=torch.bfloat16).train()
    x = torch.randn(4, 128, dtype=torch.bfloat16, requires_grad=True)
    layer(x).float().pow(2).sum().backward()
    assert x.grad is not None and layer.bias.grad is not None
    assert layer.weight.grad is None and not layer.weight.requires_grad


def test_deepcopy_and_repr():
    layer = Linear4bit.from_linear(nn.Linear(64, 8))
    clone = copy.deepcopy(layer)
    assert isinstance(clone.weight, Params4bit) and clone.weight.quant_state is not layer.weight.quant_state
    x = torch.randn(2, 64)
    assert torch.equal(clone(x), layer(x))
    text = repr(layer)
    assert "quant_type=nf4" in text and "blocksize=64" in text and "compress_statistics=True" in text


def test_compile_fullgraph_module_forward():
    layer = Linear4bit.from_linear(nn.Linear(128, 32), compute_dtype=torch.bfloat16)
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), layer(x))
