"""The Python side of the LoRA ops (``lora_forward``, ``lora_backward``), apart from their fake kernels.

Argument checks repeating ``csrc/common/checks_lora.h`` with the same words, used by the fake kernels in
``_ops.py``, and the registered autograd of ``lora_forward``. (torch requires ``register_fake`` of a C++ op to be
called from the module that ``csrc/ops.cpp`` names; ``_ops.py`` imports this one, so ``import bnbx`` registers the
autograd.)
"""

from __future__ import annotations

import math

import torch

from ._checks import check_float_dtype, check_same_device
from ._formats import dtype_name as _dtype_name


def check_lora_args(
    op: str, x: torch.Tensor, y: torch.Tensor, y_name: str, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float
) -> None:
    """x [..., K], lora_A [r, K], lora_B [N, r] (one float dtype), y [..., N] with x's leading sizes."""
    check_float_dtype(op, "x", x.dtype)
    check_float_dtype(op, y_name, y.dtype)
    check_float_dtype(op, "lora_A", lora_A.dtype)
    torch._check_type(
        lora_B.dtype == lora_A.dtype,
        lambda: f"{op}: lora_B must have lora_A's dtype {_dtype_name(lora_A.dtype)}, got {_dtype_name(lora_B.dtype)}",
    )
    torch._check_value(
        lora_A.dim() == 2 and lora_A.shape[0] >= 1,
        lambda: f"{op}: lora_A must be [r, in_features] with r >= 1, got shape {list(lora_A.shape)}",
    )
    r, K = lora_A.shape
    torch._check_value(
        lora_B.dim() == 2 and lora_B.shape[1] == r,
        lambda: f"{op}: lora_B must be [out_features, {r}] (r = lora_A's rows), got shape {list(lora_B.shape)}",
    )
    N = lora_B.shape[0]
    torch._check_value(
        x.dim() >= 1 and x.shape[-1] == K,
        lambda: f"{op}: x's last dimension must equal in_features ({K}, lora_A's columns), got x of shape "
        f"{list(x.shape)}",
    )
    torch._check_value(
        y.dim() == x.dim() and y.shape[-1] == N and y.shape[:-1] == x.shape[:-1],
        lambda: f"{op}: {y_name} must have x's leading sizes and out_features ({N}, lora_B's rows) last, got "
        f"{y_name} of shape {list(y.shape)} for x of shape {list(x.shape)}",
    )
    check_same_device(op, x, "x", y, y_name)
    check_same_device(op, x, "x", lora_A, "lora_A")
    check_same_device(op, x, "x", lora_B, "lora_B")
    torch._check_value(math.isfinite(scaling), lambda: f"{op}: scaling must be finite, got {scaling:g}")


def _lora_forward_setup(ctx, inputs, output) -> None:
    x, _, lora_A, lora_B, scaling = inputs
    ctx.scaling = scaling
    ctx.save_for_backward(x, lora_A, lora_B)


def _lora_forward_backward(ctx, grad):
    # out = base + scaling * (x @ A^T) @ B^T: the base's gradient is grad itself; the rest is one fused op
    x, lora_A, lora_B = ctx.saved_tensors
    needs_x, needs_base, needs_A, needs_B = ctx.needs_input_grad[:4]
    grad_x = grad_A = grad_B = None
    if needs_x or needs_A or needs_B:
        grad_x, grad_A, grad_B = torch.ops.bnbx.lora_backward(grad, x, lora_A, lora_B, ctx.scaling, needs_x)
    return (
        grad_x if needs_x else None,
        grad if needs_base else None,
        grad_A if needs_A else None,
        grad_B if needs_B else None,
        None,
    )


torch.library.register_autograd("bnbx::lora_forward", _lora_forward_backward, setup_context=_lora_forward_setup)
