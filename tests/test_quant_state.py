"""QuantState serialisation: bitsandbytes key names, safetensors round trips, strict checks on hostile dicts."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from bnbx import QuantState
from bnbx import functional as F
from conftest import DEVICES


def packed_state(shape=(64, 96), nested=False, quant_type="nf4", blocksize=64, dtype=torch.bfloat16):
    A = torch.randn(shape, dtype=dtype)
    packed, state = F.quantize_4bit(A, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)
    return packed, state


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_packed_dict_uses_bitsandbytes_keys_and_json(nested, quant_type):
    _, state = packed_state(nested=nested, quant_type=quant_type)
    items = state.as_dict(packed=True)
    expected = {"absmax", "quant_map", f"quant_state.bitsandbytes__{quant_type}"}
    if nested:
        expected |= {"nested_absmax", "nested_quant_map"}
    assert set(items) == expected and all(isinstance(v, torch.Tensor) for v in items.values())
    blob = items[f"quant_state.bitsandbytes__{quant_type}"]
    metadata = json.loads(bytes(blob.tolist()).decode())
    assert metadata["quant_type"] == quant_type and metadata["blocksize"] == 64
    assert metadata["dtype"] == "bfloat16" and metadata["shape"] == [64, 96]
    assert list(metadata)[:4] == ["quant_type", "blocksize", "dtype", "shape"]
    if nested:
        assert metadata["nested_blocksize"] == 256 and metadata["nested_dtype"] == "float32"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("packed_form", [False, True], ids=["dict", "packed"])
def test_round_trip_is_bit_exact(device, nested, packed_form):
    packed, state = packed_state(nested=nested)
    items = {f"weight.{key}": value for key, value in state.as_dict(packed=packed_form).items()}
    loaded = QuantState.from_dict(items, device=device)
    assert loaded.shape == state.shape and loaded.dtype == state.dtype and loaded.nested == nested
    assert torch.equal(F.dequantize_4bit(packed.to(device), loaded).cpu(), F.dequantize_4bit(packed, state))


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_safetensors_file_round_trip(tmp_path, nested):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    packed, state = packed_state(shape=(33, 130), nested=nested)
    tensors = {"layer.weight": packed}
    tensors.update({f"layer.weight.{k}": v for k, v in state.as_dict(packed=True).items()})
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_file(tensors, str(path))
    loaded = safetensors_torch.load_file(str(path))
    stats = {k: v for k, v in loaded.items() if k.startswith("layer.weight.")}
    restored = QuantState.from_dict(stats)
    assert torch.equal(F.dequantize_4bit(loaded["layer.weight"], restored), F.dequantize_4bit(packed, state))


def test_to_moves_in_place_and_returns_self():
    _, state = packed_state(nested=True)
    assert state.to("cpu") is state


# --- hostile or corrupt metadata: every case a ValueError that names the key --------------------------------


def blob(metadata: dict, quant_type="nf4") -> dict:
    blob = torch.tensor(list(json.dumps(metadata).encode()), dtype=torch.uint8)
    return {f"quant_state.bitsandbytes__{quant_type}": blob}


def base_items(nested=False):
    _, state = packed_state(nested=nested)
    return state.as_dict(packed=True)


def with_metadata(**changes):
    items = base_items()
    key = "quant_state.bitsandbytes__nf4"
    metadata = json.loads(bytes(items[key].tolist()).decode())
    metadata.update(changes)
    items.update(blob(metadata))
    return items


def without(key):
    items = base_items(nested=True)
    del items[key]
    return items


NF4_BLOB = "quant_state.bitsandbytes__nf4"
INT4_BLOB = "quant_state.bitsandbytes__int4"

HOSTILE = {
    "unknown key": (lambda: with_metadata(evil=1), "unknown key"),
    "dtype Tensor": (lambda: with_metadata(dtype="Tensor"), "dtype must be one of"),
    "dtype float64": (lambda: with_metadata(dtype="float64"), "dtype must be one of"),
    "blocksize 3": (lambda: with_metadata(blocksize=3), "blocksize must be one of"),
    "blocksize true": (lambda: with_metadata(blocksize=True), "blocksize must be one of"),
    "shape negative": (lambda: with_metadata(shape=[-1, 64]), "non-negative"),
    "shape huge": (lambda: with_metadata(shape=[2**40, 2**40]), "too many elements"),
    "shape 8x too large": (lambda: with_metadata(shape=[512, 96]), "absmax must hold"),
    "shape float": (lambda: with_metadata(shape=[64.0, 96]), "non-negative integers"),
    "quant_type mismatch": (lambda: with_metadata(quant_type="fp4"), "does not match"),
    "absmax truncated": (lambda: {**base_items(), "absmax": base_items()["absmax"][:4]}, "absmax must hold"),
    "absmax fp16": (lambda: {**base_items(), "absmax": base_items()["absmax"].half()}, "absmax must be float32"),
    "absmax NaN": (lambda: {**base_items(), "absmax": torch.full((96,), float("nan"))}, "absmax holds NaN"),
    "absmax negative": (lambda: {**base_items(), "absmax": -torch.ones(96)}, "negative"),
    "quant_map altered": (lambda: {**base_items(), "quant_map": torch.linspace(-1, 1, 16)}, "quant_map is not"),
    "nested absmax missing": (lambda: without("nested_absmax"), "missing key"),
    "nested quant_map missing": (lambda: without("nested_quant_map"), "missing key"),
    "absmax missing": (lambda: without("absmax"), "missing key"),
    "nested_offset NaN": (lambda: nested_with(nested_offset=float("nan")), "non-standard JSON value NaN"),
    "nested_offset string": (lambda: nested_with(nested_offset="1"), "nested_offset must be a finite number"),
    "nested absmax truncated": (
        lambda: {**base_items(True), "nested_absmax": torch.ones(0)}, "nested_absmax must hold"
    ),
    "not utf-8": (lambda: {**base_items(), NF4_BLOB: torch.tensor([0xFF, 0xFE], dtype=torch.uint8)}, "not UTF-8"),
    "not json": (lambda: {**base_items(), NF4_BLOB: torch.tensor(list(b"{oops"), dtype=torch.uint8)}, "not valid JSON"),
    "json list": (lambda: {**base_items(), **blob([1, 2])}, "JSON object"),  # type: ignore[arg-type]
    "duplicate json keys": (lambda: {**base_items(), NF4_BLOB: torch.tensor(
        list(b'{"quant_type": "nf4", "quant_type": "nf4"}'), dtype=torch.uint8)}, "repeats a JSON key"),
    "10 MB blob": (
        lambda: {**base_items(), NF4_BLOB: torch.zeros(10_000_000, dtype=torch.uint8)}, "over the 4096 limit"
    ),
    "wrong blob suffix": (
        lambda: {"absmax": torch.ones(1), INT4_BLOB: torch.zeros(2, dtype=torch.uint8)}, "must end in"
    ),
    "two blobs": (lambda: {**base_items(), **blob({}, "fp4")}, "more than one"),
    "nothing": (lambda: {}, "neither"),
}


def nested_with(**changes):
    items = base_items(nested=True)
    key = "quant_state.bitsandbytes__nf4"
    metadata = json.loads(bytes(items[key].tolist()).decode())
    metadata.update(changes)
    items[key] = torch.tensor(list(json.dumps(metadata).encode()), dtype=torch.uint8)
    return items


@pytest.mark.parametrize("case", list(HOSTILE), ids=str)
def test_hostile_state_dicts_raise_value_error_naming_the_problem(case):
    make, message = HOSTILE[case]
    with pytest.raises(ValueError, match=message):
        QuantState.from_dict(make())


def test_checks_survive_python_dash_O():
    # plain if/raise, never assert: python -O must reject hostile metadata too
    code = (
        "import json, torch, bnbx\n"
        "_, s = bnbx.quantize_4bit(torch.randn(64, 64), quant_type='nf4')\n"
        "d = s.as_dict(packed=True)\n"
        "m = json.loads(bytes(d['quant_state.bitsandbytes__nf4'].tolist()))\n"
        "m['shape'] = [640, 64]\n"
        "d['quant_state.bitsandbytes__nf4'] = torch.tensor(list(json.dumps(m).encode()), dtype=torch.uint8)\n"
        "try:\n    bnbx.QuantState.from_dict(d)\nexcept ValueError as e:\n    print('rejected', e)\n"
    )
    result = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True, timeout=120)
    assert "rejected" in result.stdout and "absmax must hold" in result.stdout, result.stderr
