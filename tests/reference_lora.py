"""Plain-torch reference of the LoRA adapter ops (bnbx::lora_forward / lora_backward), in float64."""

from __future__ import annotations

import torch


def lora_forward_ref(x, base, lora_A, lora_B, scaling: float) -> torch.Tensor:
    """``base + (scaling * x @ A^T) @ B^T`` in float64 (round it to base's dtype to compare)."""
    hidden = (x.double() @ lora_A.double().t()) * scaling
    return base.double() + hidden @ lora_B.double().t()


def lora_backward_ref(grad_out, x, lora_A, lora_B, scaling: float):
    """(grad_x, grad_A, grad_B) in float64, the gradients of ``sum(grad_out * lora_forward_ref(...))``."""
    g, x64, A, B = grad_out.double(), x.double(), lora_A.double(), lora_B.double()
    rows = x.shape[:-1].numel()
    rows_x, rows_g = x64.reshape(rows, A.shape[1]), g.reshape(rows, B.shape[0])
    grad_hidden = scaling * rows_g @ B
    hidden = scaling * rows_x @ A.t()
    return (grad_hidden @ A).reshape(x.shape), grad_hidden.t() @ rows_x, rows_g.t() @ hidden


def tolerance(dtype: torch.dtype, ref: torch.Tensor, magnitude: torch.Tensor, terms: int) -> torch.Tensor:
    """What the kernels may be off by at each element: half an ulp of ``dtype`` at the result (``ref``), plus
    fp32 sums of ``terms`` products, each off by at most ``terms`` fp32 roundings of the sum of the products'
    magnitudes (``magnitude``: the same reference on |inputs|)."""
    half_ulp = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}[dtype]
    return half_ulp * ref.abs() + (terms + 4) * 2.0**-24 * magnitude
