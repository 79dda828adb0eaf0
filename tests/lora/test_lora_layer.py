"""bnbx.lora over dense nn.Linear bases: forward against a plain-torch reference, init, exact merge/unmerge,
merge_and_unload, gradients, adapter files and bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import bnbx.lora as lora
from reference_lora import assert_forward_within, lora_forward_ref

DTYPES = [torch.float32, torch.bfloat16]


class Tiny(nn.Module):
    """Named like a transformer block: q/v projections, an MLP and an output head."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.q_proj = nn.Linear(24, 40, dtype=dtype)
        self.v_proj = nn.Linear(24, 40, bias=False, dtype=dtype)
        self.mlp = nn.Sequential(nn.Linear(40, 33, dtype=dtype), nn.GELU(), nn.Linear(33, 24, dtype=dtype))
        self.norm = nn.LayerNorm(24, dtype=dtype)
        self.lm_head = nn.Linear(24, 50, bias=False, dtype=dtype)

    def forward(self, x):
        h = self.q_proj(x) + self.v_proj(x)
        return self.lm_head(self.norm(self.mlp(h)))


def reference(layer: lora.LoraLinear, x: torch.Tensor) -> torch.Tensor:
    """base(x) + (x A^T * scaling) B^T in float64 (the layer rounds it once to the output dtype)."""
    return lora_forward_ref(x, layer.base_layer(x), layer.lora_A.weight, layer.lora_B.weight, layer.scaling)


def assert_rounded_once(y: torch.Tensor, layer: lora.LoraLinear, x: torch.Tensor) -> None:
    """y is the reference rounded once to y's dtype, up to the fp32 sums' error."""
    assert_forward_within(y, x, layer.base_layer(x), layer.lora_A.weight, layer.lora_B.weight, layer.scaling)


def randomize(model: nn.Module) -> None:
    with torch.no_grad():
        for _, layer in lora.lora_layers(model):
            layer.lora_B.weight.normal_(0, 0.1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rslora", [False, True])
def test_forward_matches_reference(dtype, rslora):
    base = nn.Linear(37, 19, dtype=dtype)
    layer = lora.LoraLinear(base, r=5, lora_alpha=7, use_rslora=rslora)
    assert layer.scaling == pytest.approx(7 / (math.sqrt(5) if rslora else 5))
    assert layer.lora_A.weight.dtype == dtype  # the base's dtype
    x = torch.randn(2, 3, 37, dtype=dtype)
    assert torch.equal(layer(x), base(x))  # B starts at zero: a fresh adapter changes nothing
    randomize(nn.ModuleList([layer]))
    assert_rounded_once(layer(x), layer, x)


def test_init_kaiming_uniform_and_zero_b():
    layer = lora.LoraLinear(nn.Linear(400, 300), r=16)
    a = layer.lora_A.weight
    bound = 1 / math.sqrt(400)  # kaiming_uniform_(a=sqrt(5)) on fan_in 400
    assert a.abs().max() <= bound and a.abs().max() > 0.9 * bound
    assert a.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert torch.count_nonzero(layer.lora_B.weight) == 0


def test_adapter_dtype_override():
    layer = lora.LoraLinear(nn.Linear(8, 8, dtype=torch.bfloat16), dtype=torch.float32)
    assert layer.lora_A.weight.dtype == torch.float32
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    assert layer(x).dtype == torch.bfloat16


def test_dropout_only_in_training():
    layer = lora.LoraLinear(nn.Linear(64, 64), r=4, lora_dropout=0.5)
    randomize(nn.ModuleList([layer]))
    x = torch.randn(8, 64)
    layer.eval()
    assert_rounded_once(layer(x), layer, x)
    layer.train()
    assert not torch.allclose(layer(x).double(), reference(layer, x))
    # in training the adapter reads dropout(x), drawn in the adapter's dtype
    torch.manual_seed(1)
    y = layer(x)
    torch.manual_seed(1)
    dropped = torch.nn.functional.dropout(x.to(layer.lora_A.weight.dtype), 0.5, training=True)
    a, b = layer.lora_A.weight, layer.lora_B.weight
    assert torch.equal(y, torch.ops.bnbx.lora_forward(dropped, layer.base_layer(x), a, b, layer.scaling))


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_unmerge_exact(dtype):
    model = lora.add_lora(Tiny(dtype), "all-linear", r=4, lora_alpha=8)
    randomize(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(5, 24, dtype=dtype)
    y = model(x)
    lora.merge(model)
    assert all(layer.merged for _, layer in lora.lora_layers(model))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=0.05, atol=0.05)
    torch.testing.assert_close(model(x), y, **tol)
    lora.unmerge(model)
    after = model.state_dict()
    assert before.keys() == after.keys()
    for key in before:  # the base (and the adapters) come back bit for bit
        assert torch.equal(before[key], after[key]), key
    assert torch.equal(model(x), y)


def test_merge_twice_warns_and_unmerge_unmerged_warns():
    layer = lora.LoraLinear(nn.Linear(8, 8))
    layer.merge()
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge()
    layer.unmerge()
    with pytest.warns(UserWarning, match="not merged"):
        layer.unmerge()


def test_safe_merge_rejects_nan():
    layer = lora.LoraLinear(nn.Linear(8, 8))
    with torch.no_grad():
        layer.lora_B.weight.fill_(float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        layer.merge(safe_merge=True)
    assert not layer.merged


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_merge_and_unload_dense_rounds_once(dtype):
    model = lora.add_lora(Tiny(torch.float32), ["q_proj", "mlp.2"], r=3, lora_alpha=6)
    randomize(model)
    layers = dict(lora.lora_layers(model))
    expected = {name: (m.base_layer.weight.detach() + m.delta_weight()).to(dtype) for name, m in layers.items()}
    x = torch.randn(3, 24)
    y = model(x)
    merged = lora.merge_and_unload(model, dtype=dtype)
    assert merged is model and not list(lora.lora_layers(model))
    assert type(model.q_proj) is nn.Linear and model.q_proj.weight.dtype == dtype
    for name, weight in expected.items():
        assert torch.equal(model.get_submodule(name).weight, weight), name
    if dtype == torch.float32:
        torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no LoRA adapters"):
        lora.merge_and_unload(model)


def test_only_adapters_train():
    model = lora.add_lora(Tiny(), "all-linear", r=2)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    model(torch.randn(4, 24)).square().mean().backward()
    for name, param in model.named_parameters():
        assert (param.grad is not None) == param.requires_grad, name
    count, total = lora.trainable_parameter_count(model)
    assert count == sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)
    assert total == sum(p.numel() for p in model.parameters())


def test_gradcheck():
    layer = lora.LoraLinear(nn.Linear(6, 5, dtype=torch.float64), r=3, lora_alpha=5)
    randomize(nn.ModuleList([layer]))
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    a, b = layer.lora_A.weight, layer.lora_B.weight
    assert torch.autograd.gradcheck(lambda x, a_, b_: torch.func.functional_call(
        layer, {"lora_A.weight": a_, "lora_B.weight": b_}, (x,)), (x, a, b))


def test_targets():
    model = Tiny()
    assert lora.find_target_modules(model) == ["q_proj", "v_proj", "mlp.0", "mlp.2"]  # lm_head skipped
    assert lora.find_target_modules(model, ["q_proj", "2"]) == ["q_proj", "mlp.2"]
    assert lora.find_target_modules(model, r".*_proj") == ["q_proj", "v_proj"]
    assert lora.find_target_modules(model, ["lm_head"]) == ["lm_head"]  # asked for by name


def test_save_load_roundtrip(tmp_path):
    model = lora.add_lora(Tiny(), ["q_proj", "v_proj"], r=4, lora_alpha=16, use_rslora=True)
    randomize(model)
    path = tmp_path / "adapter.safetensors"
    lora.save_adapter(model, path)
    x = torch.randn(2, 24)
    fresh = Tiny()
    fresh.load_state_dict({k.replace("base_layer.", ""): v for k, v in model.state_dict().items()
                           if "lora_" not in k})
    lora.load_adapter(fresh, path)
    assert [n for n, _ in lora.lora_layers(fresh)] == ["q_proj", "v_proj"]
    assert fresh.q_proj.scaling == model.q_proj.scaling
    assert torch.equal(fresh(x), model(x))
    # loading into a model that already has the same adapters overwrites them
    with torch.no_grad():
        fresh.q_proj.lora_B.weight.zero_()
    lora.load_adapter(fresh, path)
    assert torch.equal(fresh(x), model(x))


def _write(path, tensors, metadata):
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)


def test_load_adapter_rejects_bad_files(tmp_path):
    model = lora.add_lora(Tiny(), ["q_proj"], r=4)
    good = tmp_path / "good.safetensors"
    lora.save_adapter(model, good)
    from safetensors import safe_open

    with safe_open(str(good), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}

    cases = {
        "not a bnbx LoRA adapter": ({}, tensors),
        "format_version": ({**meta, "format_version": "9"}, tensors),
        "malformed metadata": ({**meta, "config": "{"}, tensors),
        "exactly the keys": ({**meta, "config": json.dumps({"r": 4})}, tensors),
        "rank r": ({**meta, "config": meta["config"].replace('"r": 4', '"r": 0')}, tensors),
        "missing tensor": (meta, {"q_proj.lora_A.weight": tensors["q_proj.lora_A.weight"]}),
        "shape": (meta, {**tensors, "q_proj.lora_B.weight": torch.zeros(40, 5)}),
        "differ": ({**meta, "target_modules": json.dumps(["v_proj"])}, tensors),
    }
    for i, (match, (metadata, items)) in enumerate(cases.items()):
        path = tmp_path / f"bad{i}.safetensors"
        _write(path, items, metadata)
        with pytest.raises(ValueError, match=match):
            lora.load_adapter(lora.add_lora(Tiny(), ["q_proj"], r=4), path)


# --- bad input -------------------------------------------------------------------------------------------------


def test_targets_that_match_nothing():
    with pytest.raises(ValueError, match="matched no module.*q_proj"):
        lora.add_lora(Tiny(), ["k_proj"])
    with pytest.raises(ValueError, match="matched no module"):
        lora.add_lora(Tiny(), r"layers\.\d+\.k")
    with pytest.raises(ValueError, match="matched no module"):
        lora.add_lora(nn.Sequential(nn.ReLU()), "all-linear")
    with pytest.raises(ValueError, match="invalid regular expression"):
        lora.add_lora(Tiny(), "q_proj(")
    with pytest.raises(TypeError, match="target_modules"):
        lora.add_lora(Tiny(), [])


def test_non_linear_target():
    with pytest.raises(ValueError, match="LayerNorm, not a linear layer"):
        lora.add_lora(Tiny(), ["norm"])


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(r=0), ValueError, "rank r must be a positive integer"),
        (dict(r=-2), ValueError, "rank r"),
        (dict(r=2.5), ValueError, "rank r"),
        (dict(r=True), ValueError, "rank r"),
        (dict(lora_alpha=-1.0), ValueError, "lora_alpha must be a positive"),
        (dict(lora_alpha=0), ValueError, "lora_alpha"),
        (dict(lora_alpha=float("nan")), ValueError, "lora_alpha"),
        (dict(lora_alpha="8"), TypeError, "lora_alpha must be a number"),
        (dict(lora_dropout=1.0), ValueError, r"lora_dropout must be in \[0, 1\)"),
        (dict(lora_dropout=-0.1), ValueError, "lora_dropout"),
        (dict(use_rslora=1), TypeError, "use_rslora"),
        (dict(dtype=torch.int8), TypeError, "dtype"),
    ],
)
def test_bad_settings(kwargs, error, match):
    model = Tiny()
    with pytest.raises(error, match=match):
        lora.add_lora(model, **kwargs)
    assert not list(lora.lora_layers(model))  # nothing half-done


def test_adding_lora_twice():
    model = lora.add_lora(Tiny(), ["q_proj"])
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        lora.add_lora(model, ["v_proj"])
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        lora.LoraLinear(model.q_proj)


def test_input_feature_mismatch():
    layer = lora.LoraLinear(nn.Linear(8, 4))
    with pytest.raises(ValueError, match="input has 7 features, expected 8"):
        layer(torch.randn(2, 7))


def test_not_a_linear_base():
    with pytest.raises(TypeError, match="in_features"):
        lora.LoraLinear(nn.ReLU())


def test_model_functions_need_adapters(tmp_path):
    for fn in (lora.merge, lora.unmerge, lora.remove_lora):
        with pytest.raises(ValueError, match="no LoRA adapters"):
            fn(Tiny())
    with pytest.raises(ValueError, match="no LoRA adapters"):
        lora.save_adapter(Tiny(), tmp_path / "x.safetensors")
    with pytest.raises(TypeError, match="dtype"):
        lora.merge_and_unload(lora.add_lora(Tiny(), ["q_proj"]), dtype=torch.int8)


def test_remove_lora_restores_base():
    model = Tiny()
    q = model.q_proj
    lora.add_lora(model, "all-linear")
    lora.remove_lora(model)
    assert model.q_proj is q and not list(lora.lora_layers(model))


def test_import_bnbx_does_not_import_peft():
    import subprocess
    import sys

    code = "import sys, bnbx, bnbx.lora; assert 'peft' not in sys.modules, 'peft imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-1000:]
