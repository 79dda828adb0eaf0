"""transformers integration: BnbxConfig, the registered quantizer, from_pretrained / save_pretrained round trips,
bitsandbytes checkpoints, dequantize, memory footprint, and the standalone replace_linear / quantize_model_."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

import bnbx  # noqa: E402
from bnbx.integrations import quantize as Q  # noqa: E402
from bnbx.integrations.config import BnbxConfig  # noqa: E402

from tiny_models import tiny_llama  # noqa: E402

METHOD_CONFIGS = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "nf4-dq-bf16": dict(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    ),
    "fp4": dict(load_in_4bit=True),
    "llm.int8": dict(load_in_8bit=True),
    "int8": dict(load_in_8bit=True, llm_int8_threshold=0.0),
    "absmax8": dict(weight_only="absmax8"),
    "zeropoint8": dict(weight_only="zeropoint8"),
    "blockwise8": dict(weight_only="blockwise8"),
}
QUANTIZED = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture
def float_dir(tmp_path):
    path = tmp_path / "float"
    tiny_llama(vocab_size=64, seed=3).save_pretrained(path)
    return path


@torch.no_grad()
def _logits(model, ids):
    return model(ids).logits


def _layer(model, name="model.layers.1.mlp.down_proj"):
    return model.get_submodule(name)


def _assert_state_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def test_config_fields_defaults_and_serialisation():
    bnb_defaults = transformers.BitsAndBytesConfig(load_in_4bit=True)
    config = BnbxConfig(load_in_4bit=True)
    for field in (
        "llm_int8_threshold",
        "llm_int8_skip_modules",
        "llm_int8_enable_fp32_cpu_offload",
        "llm_int8_has_fp16_weight",
        "bnb_4bit_compute_dtype",
        "bnb_4bit_quant_type",
        "bnb_4bit_use_double_quant",
        "bnb_4bit_quant_storage",
        "load_in_4bit",
        "load_in_8bit",
    ):
        assert getattr(config, field) == getattr(bnb_defaults, field), field
    assert config.blocksize == 64 and config.method == "fp4"
    data = config.to_dict()
    assert data["quant_method"] == "bnbx" and data["bits"] == 4
    # transformers sends any config with a true load_in_4bit/8bit to bitsandbytes: they are not written
    assert "load_in_4bit" not in data and "load_in_8bit" not in data
    assert BnbxConfig.from_dict(json.loads(json.dumps(data))) == config
    nf4 = BnbxConfig.from_bitsandbytes_config(
        transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    )
    assert (nf4.method, nf4.bnb_4bit_use_double_quant, nf4.bnb_4bit_compute_dtype) == ("nf4", True, torch.bfloat16)
    assert BnbxConfig.from_bitsandbytes_config(transformers.BitsAndBytesConfig(load_in_8bit=True)).method == "llm.int8"


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({}, ValueError, "load_in_4bit=True or load_in_8bit"),
        ({"load_in_4bit": True, "load_in_8bit": True}, ValueError, "both True"),
        ({"load_in_4bit": 1}, TypeError, "load_in_4bit must be a bool"),
        ({"load_in_4bit": True, "bnb_4bit_quant_type": "int4"}, ValueError, "bnb_4bit_quant_type"),
        ({"load_in_4bit": True, "blocksize": 48}, ValueError, "blocksize"),
        ({"load_in_4bit": True, "bnb_4bit_compute_dtype": "float64"}, ValueError, "bnb_4bit_compute_dtype"),
        ({"load_in_8bit": True, "llm_int8_threshold": -1}, ValueError, "llm_int8_threshold"),
        ({"weight_only": "int3"}, ValueError, "weight_only"),
    ],
)
def test_config_rejects_bad_values(kwargs, error, match):
    with pytest.raises(error, match=match):
        BnbxConfig(**kwargs)


def test_registration_is_idempotent():
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    from bnbx.integrations import transformers as hf

    hf.register()
    hf.register()
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["bnbx"] is BnbxConfig
    assert AUTO_QUANTIZER_MAPPING["bnbx"] is hf.BnbxHfQuantizer


@pytest.mark.parametrize("name", list(METHOD_CONFIGS))
def test_from_pretrained_save_reload_bit_identical(name, float_dir, tmp_path):
    config = BnbxConfig(**METHOD_CONFIGS[name])
    model = transformers.AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=config)
    layer_type = type(_layer(model))
    assert layer_type in Q.quantized_layer_types()
    assert all(
        type(_layer(model, f"model.layers.0.{'self_attn' if p.endswith('proj') and p[0] in 'qkvo' else 'mlp'}.{p}"))
        is layer_type
        for p in QUANTIZED
    )
    assert type(model.lm_head) is torch.nn.Linear  # lm_head stays in full precision
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(0))
    logits = _logits(model, ids)
    assert torch.isfinite(logits).all()

    model.save_pretrained(tmp_path / "q")
    assert (tmp_path / "q" / "model.safetensors").is_file()
    written = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert written["quant_method"] == "bnbx"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert type(_layer(reloaded)) is layer_type
    _assert_state_equal(model.state_dict(), reloaded.state_dict())
    assert torch.equal(_logits(reloaded, ids), logits)
    reloaded.save_pretrained(tmp_path / "again")  # a reloaded model saves again, to the same bytes
    from safetensors.torch import load_file

    _assert_state_equal(
        load_file(tmp_path / "q" / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    )


def test_quantized_output_close_to_float(float_dir):
    reference = transformers.AutoModelForCausalLM.from_pretrained(float_dir)
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(1))
    expected = _logits(reference, ids)
    errors = {}
    for name in ("absmax8", "llm.int8", "nf4", "fp4"):
        model = transformers.AutoModelForCausalLM.from_pretrained(
            float_dir, quantization_config=BnbxConfig(**METHOD_CONFIGS[name])
        )
        errors[name] = (_logits(model, ids) - expected).abs().max().item()
    # more bits, closer to the float model
    assert errors["absmax8"] < errors["nf4"] and errors["llm.int8"] < errors["fp4"]
    assert errors["absmax8"] < 0.05 * expected.abs().max().item()


def test_tied_and_keep_in_fp32_modules_are_skipped(tmp_path):
    path = tmp_path / "tied"
    tiny_llama(vocab_size=64, tie=True).save_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, quantization_config=BnbxConfig(weight_only="absmax8")
    )
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight is model.model.embed_tokens.weight
    skip = BnbxConfig(weight_only="absmax8", llm_int8_skip_modules=["lm_head", "down_proj"])
    model = transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=skip)
    assert (
        type(_layer(model)) is torch.nn.Linear
        and type(_layer(model, "model.layers.0.mlp.up_proj")) is not torch.nn.Linear
    )
    float_model = tiny_llama(vocab_size=64)
    float_model._keep_in_fp32_modules = ["o_proj"]
    bnbx.quantize_model_(float_model, BnbxConfig(load_in_4bit=True))
    assert type(float_model.model.layers[0].self_attn.o_proj) is torch.nn.Linear
    assert type(float_model.model.layers[0].self_attn.q_proj) is bnbx.nn.Linear4bit


def test_memory_footprint_and_dequantize(float_dir):
    dense = transformers.AutoModelForCausalLM.from_pretrained(float_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        float_dir, quantization_config=BnbxConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    )
    quantized_weights = sum(
        m.in_features * m.out_features for m in model.modules() if isinstance(m, bnbx.nn.Linear4bit)
    )
    saved = dense.get_memory_footprint() - model.get_memory_footprint()
    # fp32 (4 bytes) -> 0.5 byte per weight + one fp32 absmax per 64 weights (0.0625 byte)
    assert saved == pytest.approx(quantized_weights * (4 - 0.5 - 4 / 64), rel=0.02)


@pytest.mark.parametrize("name", ["nf4-dq-bf16", "llm.int8", "absmax8", "blockwise8"])
def test_dequantize(name, float_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        float_dir, quantization_config=BnbxConfig(**METHOD_CONFIGS[name])
    )
    ids = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(2))
    expected = _logits(model, ids)
    weights = {
        n: Q.dequantize_layer(m, torch.float32)
        for n, m in model.named_modules()
        if isinstance(m, Q.quantized_layer_types())
    }
    dequantized = model.dequantize()
    assert not any(isinstance(m, Q.quantized_layer_types()) for m in dequantized.modules())
    assert not getattr(dequantized, "is_quantized", False) and not hasattr(dequantized.config, "quantization_config")
    for layer, weight in weights.items():
        assert torch.equal(dequantized.get_submodule(layer).weight.float(), weight)
    if name in ("nf4-dq-bf16", "absmax8", "blockwise8"):  # LLM.int8() also quantizes activations: not the same
        torch.testing.assert_close(_logits(dequantized, ids), expected, rtol=0.02, atol=0.02)


@pytest.mark.parametrize("bits", [4, 8])
def test_bitsandbytes_checkpoint_loads_into_bnbx(bits, tmp_path):
    pytest.importorskip("bitsandbytes")
    float_dir = tmp_path / "float"  # bitsandbytes' CPU 4-bit path needs in_features divisible by its block
    tiny_llama(vocab_size=64, seed=4, intermediate=128).save_pretrained(float_dir)
    if bits == 4:
        bnb_config = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True
        )
    else:
        bnb_config = transformers.BitsAndBytesConfig(load_in_8bit=True)
    try:
        bnb_model = transformers.AutoModelForCausalLM.from_pretrained(
            float_dir, quantization_config=bnb_config, device_map="cpu"
        )
    except (RuntimeError, ImportError) as error:  # a bitsandbytes build without a CPU backend
        pytest.skip(f"bitsandbytes cannot quantize here: {error}")
    bnb_model.save_pretrained(tmp_path / "bnb")
    loaded = bnbx.integrations.transformers.load_bitsandbytes_checkpoint(tmp_path / "bnb")
    expected_type = bnbx.nn.Linear4bit if bits == 4 else bnbx.nn.Linear8bitLt
    assert type(_layer(loaded)) is expected_type
    bnb_state = {k: v.cpu() for k, v in bnb_model.state_dict().items()}
    ours = loaded.state_dict()
    for key, value in bnb_state.items():
        if key.endswith("weight_format"):
            continue
        assert torch.equal(ours[key].cpu(), value), key
    ids = torch.randint(0, 64, (1, 8))
    torch.testing.assert_close(_logits(loaded, ids), _logits(bnb_model, ids).float(), rtol=0.02, atol=0.02)


def test_bnbx_checkpoint_without_import_bnbx_fails_clearly(float_dir, tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        float_dir, quantization_config=BnbxConfig(load_in_4bit=True)
    )
    model.save_pretrained(tmp_path / "q")
    code = (
        "import transformers, sys\n"
        "try:\n"
        f"    transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path / 'q')!r})\n"
        "except Exception as error:\n"
        "    print('RAISED', error)\n"
        "else:\n"
        "    print('LOADED')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert "Unknown quantization type, got bnbx" in output  # transformers' warning
    assert "run_import_bnbx_before_from_pretrained" in output  # the marker tensor in its load report
    assert "RAISED" in result.stdout  # the packed weights do not fit a float model: no silent load


def test_standalone_replace_and_dequantize():
    model = tiny_llama(vocab_size=64, seed=5)
    reference = {name: m.weight.detach().clone() for name, m in model.named_modules() if type(m) is torch.nn.Linear}
    bnbx.replace_linear(model, "absmax8")
    assert type(model.lm_head) is torch.nn.Linear
    layers = [name for name, m in model.named_modules() if isinstance(m, bnbx.nn.LinearAbsmax8)]
    assert len(layers) == 2 * len(QUANTIZED)
    bnbx.dequantize_model(model)
    for name in layers:
        weight = model.get_submodule(name).weight
        step = reference[name].abs().amax(dim=1, keepdim=True) / 127
        assert ((weight - reference[name]).abs() <= step / 2 + 1e-7).all()
    with pytest.raises(ValueError, match="unknown method"):
        bnbx.replace_linear(model, "int3")
