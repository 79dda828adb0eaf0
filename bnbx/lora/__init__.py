"""LoRA adapters over dense and bnbx-quantized linear layers: add, train, merge exactly, save, and peft
interop (see ``bnbx.lora.peft``, imported on demand)."""

from ._peft_hook import install as _install_peft_hook
from .io import load_adapter, save_adapter
from .layer import AdapterConfig, LoraLinear
from .model import (
    LayerError,
    add_lora,
    find_target_modules,
    lora_layers,
    lora_state_dict,
    merge,
    merge_and_unload,
    remove_lora,
    trainable_parameter_count,
    unmerge,
)
from .prepare import prepare_model_for_kbit_training

_install_peft_hook()

__all__ = [
    "AdapterConfig",
    "LayerError",
    "LoraLinear",
    "add_lora",
    "find_target_modules",
    "load_adapter",
    "lora_layers",
    "lora_state_dict",
    "merge",
    "merge_and_unload",
    "prepare_model_for_kbit_training",
    "remove_lora",
    "save_adapter",
    "trainable_parameter_count",
    "unmerge",
]
