"""The Python side of the QAT ops (fake_quantize, fake_quantize_lsq), apart from their fake kernels.

Argument checks repeating ``csrc/common/checks_fake_quant.h`` with the same words, used by the fake kernels in
``_ops.py`` and by ``bnbx.qat``, and the registered autograd of both ops. The fake kernels themselves stay in
``_ops.py``: torch requires ``register_fake`` of a C++ op to be called from the module that ``csrc/ops.cpp``
names in ``set_python_module``. ``_ops.py`` imports this module, so ``import bnbx`` registers the autograd.
"""

from __future__ import annotations

import math

import torch

from ._checks import check_float_dtype
from ._formats import dtype_name as _dtype_name

# --- fake_quant (MinMax) ----------------------------------------------------------------------------------------
# Straight-through gradient. Scales and zero points are statistics (no gradient); the learnable-scale path
# (LSQ) is the fake_quant_lsq block below.
FAKE_QUANT_MASKS = ("none", "range", "absolute")


def check_fake_quantize_args(x: torch.Tensor, group_size: int, bits: int, mask: str, clip: float) -> None:
    op = "fake_quantize"
    check_float_dtype(op, "x", x.dtype)
    torch._check_value(2 <= bits <= 8, lambda: f"{op}: bits must be from 2 to 8, got {bits}")
    torch._check_value(group_size >= 1, lambda: f"{op}: group_size must be at least 1, got {group_size}")
    torch._check_value(
        mask in FAKE_QUANT_MASKS, lambda: f"{op}: mask must be 'none', 'range' or 'absolute', got '{mask}'"
    )
    torch._check_value(clip > 0.0, lambda: f"{op}: clip must be positive, got {clip}")


def fake_quant_grid(bits: int, full_range: bool) -> tuple[float, float]:
    """(qmin, qmax) of the integer grid, as csrc/common/checks_fake_quant.h defines it."""
    qmax = float(2 ** (bits - 1) - 1)
    return (-qmax - 1.0 if full_range else -qmax), qmax


def _fake_quantize_setup(ctx, inputs, output) -> None:
    _, group_size, bits, _, full_range, mask, clip = inputs
    x = inputs[0]
    ctx.mask, ctx.clip, ctx.group_size = mask, clip, group_size
    ctx.grid = fake_quant_grid(bits, full_range)
    _, scale, zero_point = output
    if mask == "none":
        ctx.save_for_backward()
    else:
        ctx.save_for_backward(x, scale, zero_point)


def _fake_quantize_backward(ctx, grad_out, grad_scale, grad_zero_point):
    if ctx.mask == "none" or grad_out is None:
        return grad_out, None, None, None, None, None, None
    x, scale, zero_point = ctx.saved_tensors
    if ctx.mask == "absolute":
        keep = x.abs() < ctx.clip  # LLM-QAT's clip_val: no gradient at |x| >= clip
    else:
        # the code before clamping, as the kernel computes it (x * (1 / scale), round half to even)
        n, size = x.numel(), ctx.group_size
        flat = x.reshape(-1).float()
        pad = (-n) % size
        groups = torch.nn.functional.pad(flat, (0, pad)).view(-1, size)
        inv = torch.where(scale == 0, torch.zeros_like(scale), 1.0 / scale)[:, None]
        # a subnormal scale, whose reciprocal overflows, divides (as the kernel does)
        scaled = torch.where(inv.isinf(), groups / scale[:, None], groups * inv)
        code = torch.round(scaled) + zero_point.float()[:, None]
        qmin, qmax = ctx.grid
        keep = ((code >= qmin) & (code <= qmax)).view(-1)[:n].view(x.shape)
    return grad_out * keep, None, None, None, None, None, None


torch.library.register_autograd("bnbx::fake_quantize", _fake_quantize_backward, setup_context=_fake_quantize_setup)


# --- fake_quant_lsq (LSQ / LSQ+) ------------------------------------------------------------------------------
# The checks of check_fake_quantize_lsq_args, and the autograd formula: the backward is one more fused op.
LSQ_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# Plain raises rather than torch._check: bnbx.qat.fake_quantize_lsq calls these too, and torch.compile cannot
# trace a torch._check message that formats tensor shapes.
def _check_lsq_param_shape(op: str, name: str, x: torch.Tensor, t: torch.Tensor) -> bool:
    """Whether ``t`` holds one value per row of ``x`` (x's leading sizes followed by ones); False for one value."""
    if t.dim() > x.dim():
        raise ValueError(f"{op}: {name} has more dimensions ({t.dim()}) than x ({x.dim()})")
    if t.numel() == 1:
        return False
    aligned = [1] * (x.dim() - t.dim()) + list(t.shape)
    k = 0  # the sizes after the last one that is not 1
    for j, size in enumerate(aligned):
        if size != 1:
            k = j + 1
    if aligned[:k] != list(x.shape[:k]):
        example = [x.shape[0]] + [1] * (x.dim() - 1) if x.dim() else []
        raise ValueError(
            f"{op}: {name} of shape {list(t.shape)} must hold one value or one per row of x of shape "
            f"{list(x.shape)}: x's leading sizes followed by ones, e.g. {example}"
        )
    return True


def check_fake_quantize_lsq_args(
    op: str, x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, qmin: float, qmax: float
) -> None:
    for name, t in (("x", x), ("scale", scale), ("offset", offset)):
        if t.dtype not in LSQ_FLOATS:
            raise TypeError(f"{op}: {name} must be float32, float16, bfloat16 or float64, got {_dtype_name(t.dtype)}")
    for name, t in (("scale", scale), ("offset", offset)):
        if t.device != x.device:
            raise RuntimeError(
                f"{op}: expected all tensors on the same device, got x on {x.device} and {name} on {t.device}"
            )
    if not (math.isfinite(qmin) and math.isfinite(qmax) and qmin < qmax):
        raise ValueError(f"{op}: qmin and qmax must be finite with qmin < qmax, got qmin={qmin:g}, qmax={qmax:g}")
    scale_per_row = _check_lsq_param_shape(op, "scale", x, scale)
    offset_per_row = _check_lsq_param_shape(op, "offset", x, offset)
    if scale_per_row and offset_per_row and scale.numel() != offset.numel():
        raise ValueError(
            f"{op}: scale of shape {list(scale.shape)} and offset of shape {list(offset.shape)} must have as "
            "many values when both have more than one"
        )


def check_grad_scale(op: str, grad_scale: float) -> None:
    if not math.isfinite(grad_scale):
        raise ValueError(f"{op}: grad_scale must be finite, got {grad_scale:g}")


def _fake_quantize_lsq_setup(ctx, inputs, output) -> None:
    x, scale, offset, qmin, qmax, grad_scale = inputs
    ctx.args = (qmin, qmax, grad_scale)
    ctx.save_for_backward(x, scale, offset)


def _fake_quantize_lsq_backward(ctx, grad):
    x, scale, offset = ctx.saved_tensors
    grad_x, grad_scale, grad_offset = torch.ops.bnbx.fake_quantize_lsq_backward(grad, x, scale, offset, *ctx.args)
    return grad_x, grad_scale, grad_offset, None, None, None


torch.library.register_autograd(
    "bnbx::fake_quantize_lsq", _fake_quantize_lsq_backward, setup_context=_fake_quantize_lsq_setup
)
