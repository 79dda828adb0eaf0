"""What LoRA needs from a base layer: its dense weight (decoded once), its compute dtype, and how to rebuild it.

Any layer with ``in_features``, ``out_features``, a forward and either a float ``weight`` (``nn.Linear``) or a
``dequantize()`` method (bnbx ``Linear4bit``, ``Linear8bitLt``) can carry an adapter. 4-bit weights are decoded
straight to fp32 (``code * absmax`` is exact there), so a merged weight is rounded only once, to its final dtype.
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch
from torch import nn

from ..quant_state import QuantState

__all__ = ["FUSED_DTYPES", "adapter_input", "base_compute_dtype", "base_weight_dtype", "dense_weight",
           "is_quantized_layer", "packed_parameters"]

# The dtypes torch.ops.bnbx.lora_forward takes (activations and adapters): the fused adapter runs on these.
FUSED_DTYPES = frozenset((torch.float32, torch.float16, torch.bfloat16))


def adapter_input(x: torch.Tensor, dropout: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """What an adapter reads: ``x`` as it is (the fused op converts as it loads), or, with dropout in training,
    ``dropout(x)`` drawn in the adapter's dtype (as peft and the unfused adapter draw it)."""
    if isinstance(dropout, nn.Dropout) and dropout.training:
        return dropout(x.to(dtype))
    return x


def _quant_state(layer: nn.Module) -> Optional[QuantState]:
    state = getattr(getattr(layer, "weight", None), "quant_state", None)
    if state is None:  # FSDP replaces the weight Parameter; the layer keeps its own reference
        state = getattr(layer, "quant_state", None)
    return state if isinstance(state, QuantState) else None


def is_quantized_layer(layer: nn.Module) -> bool:
    """True for a layer whose weight is stored quantized (it has ``dequantize()`` or a 4-bit quant_state)."""
    if _quant_state(layer) is not None:
        return True
    weight = getattr(layer, "weight", None)
    return callable(getattr(layer, "dequantize", None)) and isinstance(weight, torch.Tensor) and (
        not weight.is_floating_point() or type(layer) is not nn.Linear
    )


def packed_parameters(model: nn.Module) -> set[int]:
    """ids of the parameters that hold quantized codes (never to be cast, trained or counted as floats)."""
    ids = set()
    for module in model.modules():
        if is_quantized_layer(module):
            weight = getattr(module, "weight", None)
            if isinstance(weight, nn.Parameter):
                ids.add(id(weight))
    return ids


def base_compute_dtype(layer: nn.Module) -> torch.dtype:
    """The dtype the layer computes in: ``compute_dtype`` when it has one, else its float weight's dtype."""
    dtype = getattr(layer, "compute_dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    weight = getattr(layer, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_floating_point() and not is_quantized_layer(layer):
        return weight.dtype
    state = _quant_state(layer)
    if state is not None:
        return state.dtype
    return torch.float32


def base_weight_dtype(layer: nn.Module) -> torch.dtype:
    """The dtype the layer's weight had before it was quantized (what a dense copy should use)."""
    state = _quant_state(layer)
    if state is not None:
        return state.dtype
    weight = getattr(layer, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_floating_point() and not is_quantized_layer(layer):
        return weight.dtype
    return base_compute_dtype(layer)


def dense_weight(layer: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The layer's weight as a dense ``[out_features, in_features]`` tensor of ``dtype``, detached.

    4-bit weights decode directly to ``dtype`` (one rounding from the exact fp32 ``code * absmax``); other
    quantized layers go through their ``dequantize()``; float weights are cast.
    """
    state = _quant_state(layer)
    weight = layer.weight
    if state is not None and state.quant_type in ("nf4", "fp4"):
        packed = weight.detach()
        if hasattr(packed, "as_subclass"):
            packed = packed.as_subclass(torch.Tensor)
        dense = torch.ops.bnbx.dequantize_4bit(
            packed, state.get_absmax(), state.blocksize, state.quant_type, list(state.shape), dtype
        )
    elif is_quantized_layer(layer):
        dequantize = layer.dequantize
        try:
            takes_dtype = "dtype" in inspect.signature(dequantize).parameters
        except (TypeError, ValueError):
            takes_dtype = False
        dense = dequantize(dtype=dtype) if takes_dtype else dequantize()
        dense = dense.detach().to(dtype)
    else:
        dense = weight.detach().to(dtype)
    expected = (layer.out_features, layer.in_features)
    if tuple(dense.shape) != expected:
        raise RuntimeError(
            f"{type(layer).__name__}: the decoded weight has shape {list(dense.shape)}, expected {list(expected)}"
        )
    return dense
