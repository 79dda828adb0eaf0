"""``prepare_model_for_kbit_training``: peft's recipe, safe for packed weights of any storage dtype."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ._base import packed_parameters

__all__ = ["prepare_model_for_kbit_training"]


def prepare_model_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: Optional[dict[str, Any]] = None,
) -> nn.Module:
    """Get a quantized model ready for adapter training, in place; returns ``model``.

    Like ``peft.prepare_model_for_kbit_training``: freezes every parameter, casts fp16/bf16 parameters to
    fp32 (norms, embeddings, the output layer) and enables gradient checkpointing with inputs that require
    grad. Unlike peft, which spares only a class named ``Params4bit``, it never casts packed weights
    (recognised by their layer, so bf16 ``quant_storage`` for FSDP stays packed) and it enables checkpointing
    for any model with ``gradient_checkpointing_enable`` (transformers models).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"prepare_model_for_kbit_training: model must be an nn.Module, got {type(model).__name__}")
    kwargs = dict(gradient_checkpointing_kwargs or {})
    packed = packed_parameters(model)
    for param in model.parameters():
        param.requires_grad_(False)
        if id(param) not in packed and param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.to(torch.float32)
    if not use_gradient_checkpointing:
        return model
    enable = getattr(model, "gradient_checkpointing_enable", None)
    if not callable(enable):
        raise ValueError(
            f"prepare_model_for_kbit_training: {type(model).__name__} has no gradient_checkpointing_enable(); "
            "pass use_gradient_checkpointing=False"
        )
    if kwargs.get("use_reentrant", True):
        # reentrant checkpointing only back-propagates into a segment whose inputs require grad
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        else:
            embeddings = model.get_input_embeddings()
            embeddings.register_forward_hook(lambda module, inputs, output: output.requires_grad_(True))
    enable(gradient_checkpointing_kwargs=kwargs) if kwargs else enable()
    return model
