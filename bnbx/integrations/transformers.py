"""bnbx in transformers: ``from_pretrained(path, quantization_config=BnbxConfig(...))``.

``import bnbx`` registers :class:`~bnbx.BnbxConfig` and :class:`BnbxHfQuantizer` under
``quant_method="bnbx"`` with transformers' plugin API (``register_quantization_config`` /
``register_quantizer``), once. Then:

- ``from_pretrained(float_checkpoint, quantization_config=BnbxConfig(load_in_4bit=True, ...))`` quantizes
  while loading (``lm_head``, tied weights and ``_keep_in_fp32_modules`` stay in full precision);
- ``save_pretrained`` writes safetensors with bitsandbytes' tensor layout and ``quant_method: "bnbx"``;
  ``from_pretrained(that_dir)`` reloads the same bytes (``import bnbx`` first);
- ``model.dequantize()`` gives back a dense model; :func:`load_bitsandbytes_checkpoint` loads a checkpoint
  written by bitsandbytes into bnbx layers.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps, WeightConverter
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.quantizers.quantizers_utils import get_module_from_name

from . import quantize as _quantize
from .config import BnbxConfig

logger = logging.getLogger("bnbx")

# the checkpoint keys of one quantized layer, relative to the layer (bitsandbytes' names for 4- and 8-bit)
_SERIALIZED = {
    "4bit": ["weight", "weight.nested_absmax", "weight.nested_quant_map", "weight.quant_map", "weight.absmax",
             "weight.quant_state.bitsandbytes__nf4", "weight.quant_state.bitsandbytes__fp4"],
    "8bit": ["weight", "SCB", "weight_format"],
    "absmax8": ["weight", "weight_scale", "weight_zero_point"],
    "zeropoint8": ["weight", "weight_scale", "weight_zero_point"],
    "blockwise8": ["weight", "weight_absmax"],
}


# A tensor every bnbx checkpoint carries, so that transformers without bnbx (no `import bnbx`) names the fix in
# its load report; bnbx's loader ignores it.
MARKER = "bnbx_quantized_checkpoint.run_import_bnbx_before_from_pretrained"


def _serialized_names(config: BnbxConfig) -> list[str]:
    if config.weight_only:
        return _SERIALIZED[config.weight_only]
    return _SERIALIZED["4bit" if config.load_in_4bit else "8bit"]


def _empty_layer(linear: nn.Module, config: BnbxConfig, dtype: Optional[torch.dtype]) -> nn.Module:
    """A bnbx layer on the meta device, shaped like ``linear``, waiting for its weights."""
    method = config.method
    layer = _quantize.require_method(method)
    bias = linear.bias is not None
    with torch.device("meta"):
        if method in ("nf4", "fp4"):
            return layer(linear.in_features, linear.out_features, bias, config.bnb_4bit_compute_dtype,
                         compress_statistics=config.bnb_4bit_use_double_quant, quant_type=method,
                         quant_storage=config.bnb_4bit_quant_storage, blocksize=config.blocksize)
        if method in ("int8", "llm.int8"):
            return layer(linear.in_features, linear.out_features, bias,
                         has_fp16_weights=config.llm_int8_has_fp16_weight, threshold=config.llm_int8_threshold)
        kwargs = {"blocksize": config.blocksize} if method == "blockwise8" else {}
        return layer(linear.in_features, linear.out_features, bias, dtype=dtype or torch.float32, **kwargs)


def _built_layer(model: nn.Module, layer_name: str, tensors: dict[str, torch.Tensor], config: BnbxConfig,
                 quantize: bool) -> nn.Module:
    """Build the layer ``layer_name`` from checkpoint tensors (relative names), install it in ``model`` and
    return it. ``quantize``: ``tensors["weight"]`` is the float weight to quantize; else the stored tensors."""
    old, _ = get_module_from_name(model, layer_name + ".weight")
    weight = tensors["weight"]
    bias = old.bias if old.bias is not None and old.bias.device.type != "meta" else None
    if quantize:
        linear = nn.Linear(old.in_features, old.out_features, bias=old.bias is not None, device="meta")
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if old.bias is not None:
            linear.bias = nn.Parameter(bias if bias is not None else torch.zeros(old.out_features, dtype=weight.dtype,
                                                                                 device=weight.device),
                                       requires_grad=False)
        new = _quantize._new_layer(linear, config)
    else:
        new = _empty_layer(old, config, getattr(old, "dtype", None))
        state = dict(tensors)
        if bias is not None:
            state["bias"] = bias
        result = new.load_state_dict(state, strict=False, assign=True)
        bad = [key for key in result.unexpected_keys]
        if bad:
            raise ValueError(f"bnbx: unexpected tensors for layer {layer_name}: {bad}")
    new.source_cls = getattr(old, "source_cls", nn.Linear)
    new.requires_grad_(False)
    new._is_hf_initialized = True
    model.set_submodule(layer_name, new)
    return new


class _BnbxQuantize(ConversionOps):
    """Load-time op: quantize a float weight into the bnbx layer waiting for it."""

    def __init__(self, hf_quantizer: "BnbxHfQuantizer") -> None:
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict: dict[str, Any], model: Optional[nn.Module] = None,
                full_layer_name: Optional[str] = None, missing_keys: Any = None, **kwargs: Any) -> dict[str, Any]:
        result = {}
        for param_name, value in input_dict.items():
            value = value[0] if isinstance(value, list) else value
            layer_name = param_name.rsplit(".", 1)[0]
            new = _built_layer(model, layer_name, {"weight": value}, self.hf_quantizer.quantization_config, True)
            _discard_companions(missing_keys, layer_name, new)
            result[param_name] = new.weight
        return result


class _BnbxDeserialize(ConversionOps):
    """Load-time op: rebuild a bnbx layer from its stored tensors (bnbx's or bitsandbytes' layout)."""

    def __init__(self, hf_quantizer: "BnbxHfQuantizer") -> None:
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict: dict[str, Any], model: Optional[nn.Module] = None,
                full_layer_name: Optional[str] = None, missing_keys: Any = None, **kwargs: Any) -> dict[str, Any]:
        tensors = {key: (value[0] if isinstance(value, list) else value) for key, value in input_dict.items()}
        module, _ = get_module_from_name(model, full_layer_name)
        if not isinstance(module, _quantize.quantized_layer_types()):
            return tensors  # a weight of a layer left unquantized (norms, embeddings, lm_head)
        if "weight" not in tensors:
            raise ValueError(f"bnbx: the checkpoint has quantization data but no weight for {full_layer_name}")
        layer_name = full_layer_name.rsplit(".", 1)[0]
        weight = tensors["weight"]
        if weight.dtype in (torch.int8, torch.uint8) and weight.dim() == 2 and weight.shape[1] == 1 \
                and not self.hf_quantizer.quantization_config.load_in_4bit \
                and weight.numel() == module.in_features * module.out_features:
            tensors["weight"] = weight.reshape(module.out_features, module.in_features)  # stored as a column
        new = _built_layer(model, layer_name, tensors, self.hf_quantizer.quantization_config, False)
        _discard_companions(missing_keys, layer_name, new)
        return {"weight": new.weight}


def _discard_companions(missing_keys: Any, layer_name: str, layer: nn.Module) -> None:
    """The layer's buffers arrive with its weight: they are not missing."""
    if missing_keys is None:
        return
    for name, _ in layer.named_buffers():
        missing_keys.discard(f"{layer_name}.{name}")


class BnbxHfQuantizer(HfQuantizer):
    """transformers' hooks for bnbx: replace linears before loading, quantize or deserialize while loading."""

    requires_calibration = False

    def __init__(self, quantization_config: BnbxConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self.modules_to_not_convert: list[str] = []

    @property
    def quantized_element_size(self) -> float:
        return 0.5 if self.quantization_config.load_in_4bit else 1.0

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        _quantize.require_method(self.quantization_config.method)
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and not self.quantization_config.llm_int8_enable_fp32_cpu_offload:
            values = set(device_map.values())
            if "disk" in values:
                raise ValueError("bnbx: offloading quantized layers to disk is not supported; "
                                 "set llm_int8_enable_fp32_cpu_offload=True to keep those modules unquantized")

    def param_needs_quantization(self, model: nn.Module, param_name: str, **kwargs: Any) -> bool:
        if self.pre_quantized or not param_name.endswith(".weight"):
            return False
        module, _ = get_module_from_name(model, param_name)
        return isinstance(module, _quantize.quantized_layer_types())

    def _process_model_before_weight_loading(self, model: nn.Module, device_map: Any = None,
                                             **kwargs: Any) -> nn.Module:
        config = self.quantization_config
        self.modules_to_not_convert = self.get_modules_to_not_convert(
            model, config.llm_int8_skip_modules, getattr(model, "_keep_in_fp32_modules", None))
        if config.llm_int8_enable_fp32_cpu_offload and isinstance(device_map, dict):
            self.modules_to_not_convert += [key for key, value in device_map.items() if value in ("cpu", "disk")]
        if self.pre_quantized:
            model._keys_to_ignore_on_load_unexpected = set(model._keys_to_ignore_on_load_unexpected or ()) | {
                MARKER.replace(".", r"\.")}
        dtype = getattr(model.config, "dtype", None)
        dtype = dtype if isinstance(dtype, torch.dtype) else None
        replaced = 0
        for name, module in list(model.named_modules()):
            if type(module) is nn.Linear and not _quantize._matches(name, self.modules_to_not_convert):
                new = _empty_layer(module, config, dtype)
                new.source_cls = type(module)
                new.requires_grad_(False)
                model.set_submodule(name, new)
                replaced += 1
        if not replaced:
            logger.warning("bnbx: no nn.Linear layer to quantize in this model")
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        _mark(model, self.quantization_config)
        # Loading ops are not reversible in transformers' sense, and need not be: the layers' state_dict is
        # already the stored layout, so saving after a load must not try to revert them.
        if hasattr(model, "_weight_conversions"):
            model._weight_conversions = [c for c in model._weight_conversions
                                         if not any(isinstance(op, (_BnbxDeserialize, _BnbxQuantize))
                                                    for op in getattr(c, "operations", ()))]
        return model

    def get_quantize_ops(self) -> ConversionOps:
        return _BnbxQuantize(self)

    def get_weight_conversions(self) -> list:
        if not self.pre_quantized:
            return []
        return [WeightConverter(_serialized_names(self.quantization_config), "weight",
                                [_BnbxDeserialize(self)])]

    def get_state_dict_and_metadata(self, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
        """The layers' own state_dict (bitsandbytes' keys), with every 8-bit weight stored as one column like
        the 4-bit packed weights, and the marker: transformers without bnbx then fails on the shapes instead of
        loading int8 codes as float weights."""
        state = model.state_dict()
        for name, module in model.named_modules():
            if isinstance(module, _quantize.quantized_layer_types()):
                key = f"{name}.weight"
                weight = state.get(key)
                if weight is not None and weight.dtype in (torch.int8, torch.uint8) and weight.dim() == 2 \
                        and weight.shape[1] != 1:
                    state[key] = weight.reshape(-1, 1)
        state[MARKER] = torch.ones(1, dtype=torch.uint8)
        return state, {}

    def is_serializable(self, safe_serialization: Any = None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    def _dequantize(self, model: nn.Module, dtype: Any = None) -> nn.Module:
        if isinstance(dtype, str):  # transformers passes config.dtype, a name
            dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(dtype)
        return _quantize.dequantize_model(model, dtype)


def _mark(model: nn.Module, config: BnbxConfig) -> None:
    model.is_loaded_in_4bit = config.load_in_4bit and not config.weight_only
    model.is_loaded_in_8bit = config.load_in_8bit and not config.weight_only


def attach_quantizer(model: nn.Module, config: BnbxConfig) -> None:
    """Mark an already quantized transformers model as ``from_pretrained(quantization_config=config)`` would."""
    quantizer = BnbxHfQuantizer(config, pre_quantized=False)
    model.hf_quantizer = quantizer
    model.is_quantized = True
    model.quantization_method = "bnbx"
    model.config.quantization_config = config
    _mark(model, config)


def register() -> None:
    """Register ``quant_method="bnbx"`` with transformers (idempotent; ``import bnbx`` calls it)."""
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get("bnbx") is not BnbxConfig:
        AUTO_QUANTIZATION_CONFIG_MAPPING.pop("bnbx", None)
        register_quantization_config("bnbx")(BnbxConfig)
    if AUTO_QUANTIZER_MAPPING.get("bnbx") is not BnbxHfQuantizer:
        AUTO_QUANTIZER_MAPPING.pop("bnbx", None)
        register_quantizer("bnbx")(BnbxHfQuantizer)


def load_bitsandbytes_checkpoint(path: str | os.PathLike, blocksize: Optional[int] = None, **kwargs: Any) -> nn.Module:
    """Load a causal LM saved by transformers + bitsandbytes (4-bit or 8-bit) into bnbx layers, without
    bitsandbytes: the config's ``BitsAndBytesConfig`` becomes a :class:`BnbxConfig` and the stored tensors
    load as they are (same layout). ``kwargs`` go to ``from_pretrained``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json")
    raw = json.loads((path / "config.json").read_text())
    quantization = raw.get("quantization_config")
    if not quantization or quantization.get("quant_method") != "bitsandbytes":
        raise ValueError(f"{path} is not a bitsandbytes checkpoint (its quantization_config is {quantization!r})")
    config = AutoConfig.from_pretrained(str(path))
    bnbx_config = BnbxConfig.from_bitsandbytes_config(quantization, blocksize=blocksize)
    config.quantization_config = bnbx_config.to_dict()
    return AutoModelForCausalLM.from_pretrained(str(path), config=config, **kwargs)
