"""Save and load LoRA adapters alone, as safetensors (tensors + JSON metadata; nothing is unpickled)."""

from __future__ import annotations

import json
import os
import re
from typing import Union

import torch
from torch import nn

from .layer import AdapterConfig
from .model import add_lora, lora_layers, lora_state_dict

__all__ = ["load_adapter", "save_adapter"]

_FORMAT = "bnbx-lora"
_FORMAT_VERSION = "1"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_CONFIG_KEYS = {"r", "lora_alpha", "lora_dropout", "use_rslora", "dtype"}
_MAX_METADATA_BYTES = 1 << 20

PathLike = Union[str, os.PathLike]


def save_adapter(model: nn.Module, path: PathLike) -> None:
    """Write the adapters of ``model`` (from :func:`bnbx.lora.add_lora`) to a safetensors file: the
    ``lora_A``/``lora_B`` weights of each layer, and the adapter settings and layer names as metadata."""
    from safetensors.torch import save_file

    layers = list(lora_layers(model))
    if not layers:
        raise ValueError("save_adapter: the model has no LoRA adapters")
    configs = {layer.config for _, layer in layers}
    if len(configs) != 1:
        raise ValueError("save_adapter: the layers' adapters have different settings; save them separately")
    metadata = {
        "format": _FORMAT,
        "format_version": _FORMAT_VERSION,
        "config": json.dumps(configs.pop().to_json_dict()),
        "target_modules": json.dumps([name for name, _ in layers]),
    }
    tensors = {key: value.contiguous().cpu() for key, value in lora_state_dict(model).items()}
    save_file(tensors, os.fspath(path), metadata=metadata)


def _read_metadata(path: str, metadata: dict[str, str] | None) -> tuple[AdapterConfig, list[str]]:
    if not metadata or metadata.get("format") != _FORMAT:
        raise ValueError(f"load_adapter: {path} is not a bnbx LoRA adapter file (metadata 'format' is missing)")
    if metadata.get("format_version") != _FORMAT_VERSION:
        raise ValueError(f"load_adapter: {path} has format_version {metadata.get('format_version')!r}, "
                         f"this bnbx reads {_FORMAT_VERSION!r}")
    if sum(len(v) for v in metadata.values()) > _MAX_METADATA_BYTES:
        raise ValueError(f"load_adapter: the metadata of {path} is too large")
    try:
        raw = json.loads(metadata["config"])
        targets = json.loads(metadata["target_modules"])
    except (KeyError, json.JSONDecodeError) as error:
        raise ValueError(f"load_adapter: malformed metadata in {path}: {error}") from None
    if not isinstance(raw, dict) or set(raw) != _CONFIG_KEYS:
        raise ValueError(f"load_adapter: metadata 'config' must hold exactly the keys {sorted(_CONFIG_KEYS)}")
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError("load_adapter: metadata 'target_modules' must be a non-empty list of module names")
    dtype = raw["dtype"]
    if dtype is not None and dtype not in _DTYPES:
        raise ValueError(f"load_adapter: metadata dtype must be one of {sorted(_DTYPES)} or null, got {dtype!r}")
    config = AdapterConfig(r=raw["r"], lora_alpha=raw["lora_alpha"], lora_dropout=raw["lora_dropout"],
                           use_rslora=raw["use_rslora"], dtype=None if dtype is None else _DTYPES[dtype])
    return config, targets


def load_adapter(model: nn.Module, path: PathLike) -> nn.Module:
    """Load an adapter written by :func:`save_adapter` into ``model``, in place.

    A model without adapters gets them first (same layers and settings as saved); a model that has them
    must have the same layers. Every saved tensor must fit its layer: missing, unexpected or mis-shaped
    tensors raise ``ValueError`` naming the key. Returns ``model``.
    """
    from safetensors import safe_open

    path = os.fspath(path)
    with safe_open(path, framework="pt") as handle:
        config, targets = _read_metadata(path, handle.metadata())
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    if not any(True for _ in lora_layers(model)):
        add_lora(model, "|".join(re.escape(t) for t in targets), r=config.r, lora_alpha=config.lora_alpha,
                 lora_dropout=config.lora_dropout, use_rslora=config.use_rslora, dtype=config.dtype)
    layers = dict(lora_layers(model))
    if sorted(layers) != sorted(targets):
        missing = sorted(set(targets) - set(layers))
        extra = sorted(set(layers) - set(targets))
        raise ValueError(f"load_adapter: the model's adapted layers differ from the file's: "
                         f"not in the model {missing[:4]}, not in the file {extra[:4]}")
    expected = lora_state_dict(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"load_adapter: missing tensor(s) {missing[:4]}, unexpected tensor(s) {unexpected[:4]}")
    for key, tensor in tensors.items():
        target = expected[key]
        if tensor.shape != target.shape:
            raise ValueError(
                f"load_adapter: {key} has shape {list(tensor.shape)}, the model needs {list(target.shape)}"
            )
        if not tensor.is_floating_point():
            raise ValueError(f"load_adapter: {key} must be a floating-point tensor, got {tensor.dtype}")
    for name, layer in layers.items():
        have = (layer.config.r, layer.config.lora_alpha, layer.config.use_rslora)
        if have != (config.r, config.lora_alpha, config.use_rslora):
            raise ValueError(f"load_adapter: {name} has (r, lora_alpha, use_rslora) = {have}, the file has "
                             f"{(config.r, config.lora_alpha, config.use_rslora)}")
    with torch.no_grad():
        for key, tensor in tensors.items():
            expected[key].copy_(tensor)
    return model
