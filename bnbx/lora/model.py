"""Model-level LoRA: pick target layers, add adapters, merge, and unload to a dense (or re-quantized) model."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Union

import torch
from torch import nn

from .._model import output_layer_names
from ._base import _quant_state, base_compute_dtype, dense_weight, is_quantized_layer
from .layer import AdapterConfig, LoraLinear

__all__ = [
    "LayerError",
    "add_lora",
    "find_target_modules",
    "lora_layers",
    "lora_state_dict",
    "merge",
    "merge_and_unload",
    "remove_lora",
    "trainable_parameter_count",
    "unmerge",
]

logger = logging.getLogger("bnbx.lora")

Targets = Union[str, Iterable[str]]


def _is_linear(module: nn.Module) -> bool:
    # bnbx's quantized layers subclass nn.Linear, as bitsandbytes' do
    return isinstance(module, nn.Linear) and not isinstance(module, LoraLinear)


def _output_layer_names(model: nn.Module) -> set[str]:
    names = output_layer_names(model)
    return names | {name for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] == "lm_head"}


def find_target_modules(model: nn.Module, target_modules: Targets = "all-linear") -> list[str]:
    """Names of the linear layers that ``target_modules`` selects.

    ``"all-linear"``: every ``nn.Linear`` (quantized ones included) except the output layer (``lm_head`` or
    ``get_output_embeddings()``). Another string: a regular expression that must match the whole module name.
    A list of strings: names that equal a module's name or its last dotted parts (``"q_proj"`` matches
    ``model.layers.0.self_attn.q_proj``). Raises ``ValueError`` when nothing matches.
    """
    if isinstance(target_modules, str):
        if target_modules == "all-linear":
            skip = _output_layer_names(model)
            names = [name for name, module in model.named_modules() if _is_linear(module) and name not in skip]
        else:
            try:
                pattern = re.compile(target_modules)
            except re.error as error:
                raise ValueError(f"target_modules: invalid regular expression {target_modules!r}: {error}") from None
            names = [name for name, module in model.named_modules() if pattern.fullmatch(name)]
    else:
        wanted = list(target_modules)
        if not wanted or not all(isinstance(t, str) and t for t in wanted):
            raise TypeError("target_modules must be 'all-linear', a regular expression, or a non-empty list of names")
        names = [
            name for name, _ in model.named_modules()
            if name and any(name == t or name.endswith("." + t) for t in wanted)
        ]
    if not names:
        linear = [name for name, module in model.named_modules() if _is_linear(module)]
        shown = ", ".join(linear[:8]) + (", ..." if len(linear) > 8 else "")
        raise ValueError(
            f"target_modules {target_modules!r} matched no module of {type(model).__name__}; "
            f"its linear layers are: {shown or 'none'}"
        )
    return names


def add_lora(
    model: nn.Module,
    target_modules: Targets = "all-linear",
    r: int = 8,
    lora_alpha: float = 8.0,
    lora_dropout: float = 0.0,
    use_rslora: bool = False,
    dtype: Optional[torch.dtype] = None,
) -> nn.Module:
    """Wrap the selected linear layers of ``model`` in :class:`LoraLinear`, in place, and freeze everything
    but the adapters.

    Args:
        model: any ``nn.Module``; its targets must be ``nn.Linear`` or bnbx quantized linear layers.
        target_modules: ``"all-linear"``, a regular expression, or a list of names (see
            :func:`find_target_modules`).
        r, lora_alpha, lora_dropout, use_rslora, dtype: see :class:`AdapterConfig`.

    Returns ``model``. Raises ``ValueError`` when a target already carries an adapter (one adapter per
    layer: merge or remove it first) or is not a linear layer.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"add_lora: model must be an nn.Module, got {type(model).__name__}")
    config = AdapterConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora, dtype=dtype)
    existing = [name for name, module in model.named_modules() if isinstance(module, LoraLinear)]
    if existing:
        raise ValueError(
            f"add_lora: the model already has LoRA adapters (on {existing[0]}{', ...' if len(existing) > 1 else ''}); "
            "call bnbx.lora.merge_and_unload or bnbx.lora.remove_lora first"
        )
    names = find_target_modules(model, target_modules)
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, nn.Linear):
            raise ValueError(f"add_lora: target {name!r} is a {type(module).__name__}, not a linear layer")
    for param in model.parameters():
        param.requires_grad_(False)
    for name in names:
        model.set_submodule(name, LoraLinear(model.get_submodule(name), config))
    return model


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLinear]]:
    """``(name, layer)`` for every :class:`LoraLinear` in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            yield name, module


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights only: ``<layer>.lora_A.weight`` and ``<layer>.lora_B.weight`` per adapted layer."""
    tensors = {}
    for name, layer in lora_layers(model):
        prefix = f"{name}." if name else ""
        tensors[prefix + "lora_A.weight"] = layer.lora_A.weight.detach()
        tensors[prefix + "lora_B.weight"] = layer.lora_B.weight.detach()
    return tensors


def _require_lora(model: nn.Module, caller: str) -> list[tuple[str, LoraLinear]]:
    layers = list(lora_layers(model))
    if not layers:
        raise ValueError(f"{caller}: the model has no LoRA adapters (add them with bnbx.lora.add_lora)")
    return layers


def merge(model: nn.Module, safe_merge: bool = False) -> nn.Module:
    """:meth:`LoraLinear.merge` on every adapted layer (exactly reversible with :func:`unmerge`)."""
    for _, layer in _require_lora(model, "merge"):
        if not layer.merged:
            layer.merge(safe_merge=safe_merge)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """:meth:`LoraLinear.unmerge` on every merged layer."""
    for _, layer in _require_lora(model, "unmerge"):
        if layer.merged:
            layer.unmerge()
    return model


def remove_lora(model: nn.Module) -> nn.Module:
    """Put the untouched base layers back, dropping the adapters (nothing is merged)."""
    for name, layer in _require_lora(model, "remove_lora"):
        model.set_submodule(name, layer.base_layer)
    return model


@dataclass(frozen=True)
class LayerError:
    """How far a re-quantized merged weight is from the exact merged weight (fp32 dequantized base + delta)."""

    max_abs: float
    rms: float
    relative_rms: float


def _dense_linear(weight: torch.Tensor, bias: Optional[torch.Tensor], dtype: torch.dtype) -> nn.Linear:
    out_features, in_features = weight.shape
    linear = nn.Linear(in_features, out_features, bias=bias is not None, device=weight.device, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    linear.requires_grad_(False)
    return linear


def _requantize_like(base: nn.Module, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> nn.Module:
    """A new layer of ``base``'s class and settings holding ``weight`` (fp32, quantized once)."""
    from_linear = getattr(type(base), "from_linear", None)
    if from_linear is None:
        raise ValueError(
            f"merge_and_unload: requantize=True needs a base class with from_linear(); {type(base).__name__} has none"
        )
    dtype = base_compute_dtype(base)
    source = _dense_linear(weight, None if bias is None else bias.float(), torch.float32)
    settings = {}
    for key in ("quant_type", "blocksize", "compress_statistics", "quant_storage", "compute_dtype"):
        value = getattr(base, key, None)
        if value is None:
            value = getattr(base.weight, key, None)
        if value is not None:
            settings[key] = value
    layer = from_linear(source, **settings)
    state, old_state = _quant_state(layer), _quant_state(base)
    if state is not None:
        # decode to the dtype the base decoded to (its codes came from fp32 here, quantized once)
        state.dtype = old_state.dtype if old_state is not None else dtype
    if layer.bias is not None and bias is not None:
        with torch.no_grad():
            layer.bias.data = bias.to(getattr(base.bias, "dtype", dtype)).clone()
    return layer


def merge_and_unload(
    model: nn.Module,
    dtype: torch.dtype = torch.bfloat16,
    requantize: bool = False,
    progressbar: bool = False,
    return_errors: bool = False,
):
    """Fold every adapter into its layer and remove the LoRA wrappers, in place.

    Each adapted layer becomes ``dense(base) + B @ A * scaling``, summed in fp32 from the exactly decoded
    base and rounded once:

    - ``requantize=False`` (default): into an ``nn.Linear`` of ``dtype``. Quantized layers without an adapter
      are decoded to ``nn.Linear`` of ``dtype`` too, so the result is a plain dense model (other parameters,
      such as norms and embeddings, keep their dtype).
    - ``requantize=True``: each adapted quantized layer is quantized again, once, from the fp32 sum, with its
      original settings (quant_type, blocksize, double quantization, storage); untouched quantized layers
      keep their codes. The error against the exact merged weight is logged per layer at INFO level and,
      with ``return_errors=True``, returned as ``{name: LayerError}``.

    Works on models adapted with :func:`add_lora` and on peft ``PeftModel``s (their base model is returned).
    Returns ``model`` (or ``(model, errors)`` with ``return_errors=True``).
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"merge_and_unload: dtype must be a floating-point torch.dtype, got {dtype!r}")
    model = _unwrap_peft(model)
    adapted = [(name, module) for name, module in model.named_modules() if _adapter_delta(module) is not None]
    if not adapted:
        raise ValueError("merge_and_unload: the model has no LoRA adapters")
    errors: dict[str, LayerError] = {}
    if progressbar:
        from tqdm.auto import tqdm  # optional dependency, only for the bar

        adapted = tqdm(adapted, desc="merging adapters")
    for name, module in adapted:
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else module.base_layer
        with torch.no_grad():
            weight = dense_weight(base, torch.float32) + _adapter_delta(module)()
            bias = _merged_bias(module, base)
            if requantize and is_quantized_layer(base):
                new = _requantize_like(base, weight, bias)
                decoded = dense_weight(new, torch.float32)
                diff = decoded - weight
                rms = float(diff.square().mean().sqrt())
                scale = float(weight.square().mean().sqrt())
                errors[name] = LayerError(float(diff.abs().max()), rms, rms / scale if scale > 0 else 0.0)
                logger.info("merge_and_unload: %s re-quantized, max |error| %.3g, relative RMS %.3g",
                            name, errors[name].max_abs, errors[name].relative_rms)
            else:
                new = _dense_linear(weight.to(dtype), None if bias is None else bias.to(dtype), dtype)
        model.set_submodule(name, new)
    if not requantize:
        for name, module in list(model.named_modules()):
            if name and is_quantized_layer(module) and isinstance(module, nn.Linear):
                bias = getattr(module, "bias", None)
                with torch.no_grad():
                    new = _dense_linear(
                        dense_weight(module, dtype), None if bias is None else bias.detach().to(dtype), dtype
                    )
                model.set_submodule(name, new)
    if hasattr(model, "peft_config"):
        del model.peft_config
    if errors:
        worst = max(errors.values(), key=lambda e: e.relative_rms)
        logger.info("merge_and_unload: re-quantized %d layers, worst relative RMS error %.3g",
                    len(errors), worst.relative_rms)
    return (model, errors) if return_errors else model


def _unwrap_peft(model: nn.Module) -> nn.Module:
    # PeftModel -> LoraModel -> the transformers model; peft's tuner layers stay inside it
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base) and hasattr(model, "peft_config"):
        return get_base()
    return model


def _adapter_delta(module: nn.Module):
    """A callable returning the layer's fp32 delta, for bnbx and peft LoRA layers; None for other modules."""
    if isinstance(module, LoraLinear):
        return lambda: module.delta_weight(torch.float32)
    lora_a = getattr(module, "lora_A", None)
    if isinstance(lora_a, nn.ModuleDict) and hasattr(module, "get_base_layer") and hasattr(module, "scaling"):
        from .peft import peft_delta_weight

        return lambda: peft_delta_weight(module)
    return None


def _merged_bias(module: nn.Module, base: nn.Module) -> Optional[torch.Tensor]:
    bias = getattr(base, "bias", None)
    bias = None if bias is None else bias.detach().float()
    lora_b = getattr(module, "lora_B", None)
    if isinstance(lora_b, nn.ModuleDict):  # peft's lora_bias=True puts a bias on B
        for adapter in _peft_active(module):
            extra = getattr(lora_b[adapter], "bias", None)
            if extra is not None:
                add = extra.detach().float() * module.scaling[adapter]
                bias = add if bias is None else bias + add
    return bias


def _peft_active(module: nn.Module) -> list[str]:
    return [name for name in module.active_adapters if name in module.lora_A]


def trainable_parameter_count(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts, counting each packed 4-bit byte as two parameters."""
    logical = {}
    for module in model.modules():
        state = _quant_state(module)
        if state is not None and isinstance(getattr(module, "weight", None), nn.Parameter):
            logical[id(module.weight)] = state.numel
    trainable = total = 0
    for param in model.parameters():
        n = logical.get(id(param), param.numel())
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total

