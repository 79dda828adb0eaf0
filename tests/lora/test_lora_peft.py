"""peft interop: LoraConfig + get_peft_model on a model with bnbx Linear4bit layers, exact merges,
merge_and_unload to a dense model, PeftModel.from_pretrained, prepare_model_for_kbit_training."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import bnbx  # noqa: E402
import bnbx.lora as lora  # noqa: E402
from bnbx.lora._base import dense_weight  # noqa: E402
from bnbx.lora.peft import PeftLoraLinear  # noqa: E402
from tiny_llama import quantize_linears, tiny_llama  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def same_bits(a, b):
    return a.dtype == b.dtype and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def quantized_llama(storage=torch.uint8, dtype=torch.float32):
    return quantize_linears(tiny_llama(hidden=64, layers=2, intermediate=160, dtype=dtype), quant_storage=storage)


def peft_model(storage=torch.uint8, dtype=torch.float32, **kwargs):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, **kwargs)
    model = peft.get_peft_model(quantized_llama(storage, dtype), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return model


def lora_modules(model):
    return [m for m in model.modules() if isinstance(m, PeftLoraLinear)]


IDS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_config_carries_bnbx_mapping():
    config = peft.LoraConfig(r=4)
    assert config._custom_modules[bnbx.nn.Linear4bit] is PeftLoraLinear
    own = type("OwnLayer", (nn.Module,), {})
    config = peft.LoraConfig(r=4)
    config._register_custom_module({bnbx.nn.Linear4bit: own})  # the user's choice wins
    assert config._custom_modules[bnbx.nn.Linear4bit] is own


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16])
def test_get_peft_model_wraps_linear4bit(storage):
    model = peft_model(storage)
    layers = lora_modules(model)
    assert len(layers) == 2 * len(TARGETS)
    assert all(isinstance(layer.get_base_layer(), bnbx.nn.Linear4bit) for layer in layers)
    assert repr(layers[0]).startswith("bnbx.lora.PeftLoraLinear(")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    out = model(input_ids=IDS, labels=IDS)
    out.loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
    # forward = base + B A x * scaling, with the adapter in its own (fp32) dtype
    layer = layers[0]
    x = torch.randn(3, layer.in_features, dtype=torch.bfloat16)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = layer.get_base_layer()(x) + ((x.float() @ a.T @ b.T) * layer.scaling["default"])
    torch.testing.assert_close(layer(x), expected.to(torch.bfloat16), rtol=0, atol=0)


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16])
def test_merge_unmerge_exact(storage):
    model = peft_model(storage)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    reference = logits(model)
    model.merge_adapter()
    assert all(layer.merged for layer in lora_modules(model))
    torch.testing.assert_close(logits(model), reference, rtol=0.05, atol=0.05)
    model.unmerge_adapter()
    after = model.state_dict()
    for key, value in base.items():
        assert same_bits(value, after[key]), key
    assert torch.equal(logits(model), reference)
    with model.disable_adapter():  # disabling a merged model unmerges first
        model.merge_adapter()
        plain = logits(model)
    assert not any(layer.merged for layer in lora_modules(model))
    assert not torch.allclose(plain, reference)


def test_merge_and_unload_gives_dense_model_rounded_once():
    model = peft_model(dtype=torch.bfloat16)  # a bf16 model: the merged layers are bf16, as the weights were
    expected = {}
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, PeftLoraLinear):
            delta = (module.lora_B["default"].weight.float() @ module.lora_A["default"].weight.float()) \
                * module.scaling["default"]
            expected[name] = (dense_weight(module.get_base_layer()) + delta).to(torch.bfloat16)
    reference = logits(model)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, bnbx.nn.Linear4bit) for m in merged.modules())
    for name, weight in expected.items():
        layer = merged.get_submodule(name)
        assert type(layer) is nn.Linear and torch.equal(layer.weight, weight), name
    torch.testing.assert_close(logits(merged), reference, rtol=0.05, atol=0.05)


def test_bnbx_merge_and_unload_on_peft_model():
    model = peft_model()
    reference = logits(model)
    merged = lora.merge_and_unload(model, dtype=torch.float32)
    assert not any(isinstance(m, (bnbx.nn.Linear4bit, PeftLoraLinear)) for m in merged.modules())
    torch.testing.assert_close(logits(merged), reference, rtol=0.05, atol=0.05)


def test_save_and_from_pretrained(tmp_path):
    model = peft_model()
    reference = logits(model)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists()
    torch.manual_seed(123)  # a different init of the fresh adapters, overwritten by the load
    base = quantized_llama()
    base.load_state_dict({k.replace("base_model.model.", "").replace(".base_layer", ""): v
                          for k, v in model.state_dict().items() if "lora_" not in k})
    loaded = peft.PeftModel.from_pretrained(base, tmp_path)
    assert len(lora_modules(loaded)) == 2 * len(TARGETS)  # registered again on load
    assert torch.equal(logits(loaded), reference)
    loaded.merge_adapter()
    torch.testing.assert_close(logits(loaded), reference, rtol=0.05, atol=0.05)


def test_dora_is_refused():
    with pytest.raises(ValueError, match="not supported on bnbx quantized layers"):
        peft_model(use_dora=True)


def test_fan_in_fan_out_is_refused():
    with pytest.raises(ValueError, match="fan_in_fan_out"):
        peft_model(fan_in_fan_out=True)


# --- prepare_model_for_kbit_training -----------------------------------------------------------------------------


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16])
def test_prepare_never_casts_packed_weights(storage):
    model = quantize_linears(tiny_llama(hidden=64, layers=2, intermediate=160, dtype=torch.bfloat16),
                             quant_storage=storage)
    packed = {n: p.detach().clone() for n, p in model.named_parameters() if isinstance(p, bnbx.nn.Params4bit)}
    assert packed
    bnbx.prepare_model_for_kbit_training(model)
    for name, param in model.named_parameters():
        assert not param.requires_grad
        if name in packed:
            assert isinstance(param, bnbx.nn.Params4bit) and same_bits(param.detach(), packed[name]), name
        else:
            assert param.dtype == torch.float32, name  # norms, embeddings, lm_head upcast as peft does
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=TARGETS))(input_ids=IDS, labels=IDS).loss.backward()


def test_prepare_bad_input():
    with pytest.raises(TypeError, match="nn.Module"):
        bnbx.prepare_model_for_kbit_training("model")
    with pytest.raises(ValueError, match="gradient_checkpointing_enable"):
        bnbx.prepare_model_for_kbit_training(nn.Linear(2, 2))
    bnbx.prepare_model_for_kbit_training(nn.Linear(2, 2), use_gradient_checkpointing=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_adapter_matches_peft_forward_and_gradients(dtype):
    # PeftLoraLinear runs bnbx's fused adapter op; peft's own forward (the parent class's) computes the same sum
    from peft.tuners.lora.layer import Linear as PeftLinear

    model = peft_model(dtype=dtype, lora_dropout=0.0)
    layer = lora_modules(model)[0]
    x = torch.randn(2, 5, layer.in_features, dtype=dtype, requires_grad=True)
    grad = torch.randn(2, 5, layer.out_features, dtype=dtype)
    results = []
    for forward in (layer.forward, lambda t: PeftLinear.forward(layer, t)):
        model.zero_grad()
        x.grad = None
        out = forward(x)
        out.backward(grad)
        results.append((out.detach().float(), x.grad.float(), layer.lora_A["default"].weight.grad.clone(),
                        layer.lora_B["default"].weight.grad.clone()))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for fused, plain in zip(*results):
        torch.testing.assert_close(fused, plain, **tol)
    assert not torch.equal(results[0][0], layer.get_base_layer()(x).detach().float())  # the adapter is there
