"""Swap a model's ``nn.Linear`` layers for bnbx's quantized layers, and back. No transformers needed.

``replace_linear`` / ``quantize_model_`` quantize a model that is already loaded; ``dequantize_model`` turns
every bnbx layer back into a dense ``nn.Linear``. The method comes from a :class:`~bnbx.BnbxConfig` (or its
short name, see :data:`METHODS`).
"""

from __future__ import annotations

import logging
import re
from typing import Any, Iterable, Optional

import torch
from torch import nn

from .._model import output_layer_names
from ..nn import weight_only

logger = logging.getLogger("bnbx")

#: method name -> what it is (``bnbx quantize --method``, ``bnbx demo``)
METHODS = {
    "absmax8": "int8 absmax per output channel (weight-only)",
    "zeropoint8": "int8 zero-point per output channel (weight-only)",
    "blockwise8": "8-bit blockwise dynamic, bitsandbytes' format (weight-only)",
    "int8": "int8 vector-wise weights and activations (Linear8bitLt, threshold 0)",
    "llm.int8": "LLM.int8(): int8 with fp16 outlier columns (Linear8bitLt, threshold 6)",
    "fp4": "FP4 4-bit (Linear4bit)",
    "nf4": "NF4 4-bit (Linear4bit)",
}


def _layer_class(name: str) -> Optional[type]:
    """bnbx.nn.<name> if this bnbx has it (Linear4bit and Linear8bitLt arrive with their own features)."""
    from .. import nn as bnbx_nn

    return getattr(bnbx_nn, name, None)


def method_layer(method: str) -> Optional[type]:
    """The module class that implements ``method``, or None where it is not available in this bnbx."""
    if method in ("nf4", "fp4"):
        return _layer_class("Linear4bit")
    if method in ("int8", "llm.int8"):
        return _layer_class("Linear8bitLt")
    if method in weight_only.WEIGHT_ONLY_CLASSES:
        return weight_only.WEIGHT_ONLY_CLASSES[method]
    raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


def available_methods() -> dict[str, bool]:
    """Every method and whether this bnbx has the layer it needs."""
    return {method: method_layer(method) is not None for method in METHODS}


def require_method(method: str) -> type:
    layer = method_layer(method)
    if layer is None:
        needed = "Linear4bit" if method in ("nf4", "fp4") else "Linear8bitLt"
        raise RuntimeError(
            f"method {method!r} is not available in this bnbx: bnbx.nn.{needed} is not part of this build"
        )
    return layer


def quantized_layer_types() -> tuple[type, ...]:
    """Every bnbx module class that holds a quantized weight (those available in this build)."""
    types = [cls for cls in weight_only.WEIGHT_ONLY_CLASSES.values()]
    for name in ("Linear4bit", "Linear8bitLt"):
        cls = _layer_class(name)
        if cls is not None:
            types.append(cls)
    return tuple(types)


def _matches(name: str, patterns: Iterable[str]) -> bool:
    """transformers' rule: a pattern matches from the start up to a module boundary, as a regex with that
    boundary, or as a suffix."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    for pattern in patterns:
        if name.endswith(pattern):
            return True
        try:
            if re.match(rf"(?:{pattern}){boundary}", name):
                return True
        except re.error:
            continue
    return False


def default_skip_modules(model: nn.Module) -> list[str]:
    """Modules left in full precision by default: the output embedding (``lm_head``), modules whose weight
    is tied to another module's, and the module of the model's last parameter (transformers' rule)."""
    skip: set[str] = set()
    tied = getattr(model, "all_tied_weights_keys", None)
    if tied:
        skip |= {key.removesuffix(".weight") for key in list(tied.keys()) + list(tied.values())}
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor):
            owners.setdefault(id(weight), []).append(name)
    for names in owners.values():
        if len(names) > 1:
            skip |= set(names)
    parameters = list(model.named_parameters())
    if parameters:
        skip.add(parameters[-1][0].rsplit(".", 1)[0])
    skip |= output_layer_names(model)
    return sorted(name for name in skip if name)


def _new_layer(linear: nn.Linear, config: Any) -> nn.Module:
    """A quantized copy of ``linear`` for ``config`` (a BnbxConfig)."""
    method = config.method
    layer = require_method(method)
    if method in ("nf4", "fp4"):
        return layer.from_linear(
            linear,
            compute_dtype=config.bnb_4bit_compute_dtype,
            compress_statistics=config.bnb_4bit_use_double_quant,
            quant_type=method,
            quant_storage=config.bnb_4bit_quant_storage,
            blocksize=config.blocksize,
        )
    if method in ("int8", "llm.int8"):
        return layer.from_linear(
            linear, threshold=config.llm_int8_threshold, has_fp16_weights=config.llm_int8_has_fp16_weight
        )
    if method == "blockwise8":
        return layer.from_linear(linear, blocksize=config.blocksize)
    return layer.from_linear(linear)


def replace_linear(
    model: nn.Module,
    config: Any,
    skip_modules: Optional[list[str]] = None,
    keep_in_fp32_modules: Optional[list[str]] = None,
    progress: bool = False,
) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (in place) by its quantized bnbx layer; returns ``model``.

    Args:
        config: a :class:`~bnbx.BnbxConfig` or a method name (``"nf4"``, ``"llm.int8"``, ... see METHODS).
        skip_modules: names (or patterns, as transformers matches them) of modules to leave alone; ``None``
            uses ``config.llm_int8_skip_modules``, and when that is None too, :func:`default_skip_modules`
            (``lm_head``, tied weights).
        keep_in_fp32_modules: further modules to leave alone (default: ``model._keep_in_fp32_modules``).
        progress: show a tqdm bar over the layers.
    """
    from .config import BnbxConfig

    config = BnbxConfig.for_method(config) if isinstance(config, str) else config
    require_method(config.method)
    skip = list(skip_modules if skip_modules is not None else (config.llm_int8_skip_modules or []))
    if skip_modules is None and config.llm_int8_skip_modules is None:
        skip += default_skip_modules(model)
    keep = keep_in_fp32_modules if keep_in_fp32_modules is not None else getattr(model, "_keep_in_fp32_modules", None)
    skip += list(keep or [])
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) is nn.Linear and not _matches(name, skip)
    ]
    if not targets:
        logger.warning("replace_linear: no nn.Linear layer to quantize (skipped: %s)", skip)
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional
        bar = targets
    else:
        bar = tqdm(targets, desc=f"quantizing ({config.method})", unit="layer", disable=not progress, leave=False)
    for name, linear in bar:
        model.set_submodule(name, _new_layer(linear, config))
    return model


def dequantize_layer(module: nn.Module, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The dense weight of a bnbx quantized layer."""
    if hasattr(module, "dequantize"):
        return module.dequantize(dtype) if dtype is not None else module.dequantize()
    linear8 = _layer_class("Linear8bitLt")
    if linear8 is not None and isinstance(module, linear8):
        weight = module.weight
        if getattr(weight, "SCB", None) is None:  # 16-bit weights kept (has_fp16_weights=True)
            return weight.data.to(dtype or weight.dtype)
        from ..functional_int8 import int8_vectorwise_dequant

        return int8_vectorwise_dequant(weight.data, weight.SCB).to(dtype or torch.float32)
    raise TypeError(f"dequantize_layer: {type(module).__name__} is not a bnbx quantized layer")


def dequantize_model(model: nn.Module, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Replace every bnbx quantized layer of ``model`` (in place) by an ``nn.Linear`` holding its dequantized
    weight (in ``dtype``, default the layer's original dtype) and its bias; returns ``model``."""
    types = quantized_layer_types()
    replaced = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, types):
            continue
        weight = dequantize_layer(module, dtype)
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        linear.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        if module.bias is not None:
            linear.bias = nn.Parameter(module.bias.detach().to(weight.dtype).clone(), requires_grad=False)
        model.set_submodule(name, linear)
        replaced += 1
    if not replaced:
        logger.warning("dequantize_model: the model has no bnbx quantized layer")
    return model


def quantize_model_(model: nn.Module, config: Any, progress: bool = False, **kwargs: Any) -> nn.Module:
    """Quantize an already loaded model in place (see :func:`replace_linear` for ``kwargs``).

    A transformers model is also marked as quantized the way ``from_pretrained(quantization_config=...)``
    marks it, so ``save_pretrained``, ``model.dequantize()`` and ``get_memory_footprint()`` work.
    """
    from .config import BnbxConfig

    config = BnbxConfig.for_method(config) if isinstance(config, str) else config
    replace_linear(model, config, progress=progress, **kwargs)
    if hasattr(model, "config") and hasattr(model, "save_pretrained"):
        from .transformers import attach_quantizer

        attach_quantizer(model, config)
    return model
