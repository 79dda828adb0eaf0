"""Plain-torch reference of the LoRA adapter ops (bnbx::lora_forward / lora_backward), in float64."""

from __future__ import annotations

import torch

from reference import HALF_ULP


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
    return HALF_ULP[dtype] * ref.abs() + (terms + 4) * 2.0**-24 * magnitude


def assert_within(actual: torch.Tensor, ref: torch.Tensor, magnitude: torch.Tensor, terms: int) -> None:
    """actual is ref rounded to actual's dtype, up to the fp32 sums' error (``tolerance``)."""
    assert actual.shape == ref.shape
    error = (actual.double() - ref.to(actual.device)).abs()
    limit = tolerance(actual.dtype, ref, magnitude, terms).to(actual.device)
    assert bool((error <= limit).all()), f"max error {error.max().item():.3g} over limit"


def assert_forward_within(out, x, base, lora_A, lora_B, scaling: float) -> None:
    """out is lora_forward_ref rounded once to out's dtype (base's), up to the fp32 sums' error."""
    assert out.dtype == base.dtype
    ref = lora_forward_ref(x, base, lora_A, lora_B, scaling)
    magnitude = lora_forward_ref(x.abs(), base.abs(), lora_A.abs(), lora_B.abs(), scaling)
    assert_within(out, ref, magnitude, x.shape[-1] + lora_A.shape[0])


def assert_backward_within(grads, grad_out, x, lora_A, lora_B, scaling: float) -> None:
    """(grad_x, grad_A, grad_B) in the dtypes of (x, lora_A, lora_B), each lora_backward_ref's rounded once."""
    assert [g.dtype for g in grads] == [x.dtype, lora_A.dtype, lora_B.dtype]
    refs = lora_backward_ref(grad_out, x, lora_A, lora_B, scaling)
    magnitudes = lora_backward_ref(grad_out.abs(), x.abs(), lora_A.abs(), lora_B.abs(), scaling)
    terms = grad_out.shape[-1] + lora_A.shape[0] + x.shape[:-1].numel()
    for actual, ref, magnitude in zip(grads, refs, magnitudes):
        assert_within(actual, ref, magnitude, terms)
