"""What bnbx's model-wide passes (bnbx.lora, bnbx.qat.prepare, quantize_model_) ask of a model the same way."""

from __future__ import annotations

from torch import nn


def output_layer_names(model: nn.Module) -> set[str]:
    """Names of the modules that are ``model.get_output_embeddings()`` (transformers' output layer; a model
    without that method, or whose method returns None, has none)."""
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    if output is None:
        return set()
    return {name for name, module in model.named_modules() if module is output}
