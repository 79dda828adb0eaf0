"""Plain-torch reference of bnbx's integer fake quantization (csrc/common/rules.h), independent of the kernels."""

from __future__ import annotations

import torch


def grid(bits: int, full_range: bool) -> tuple[float, float]:
    qmax = float(2 ** (bits - 1) - 1)
    return (-qmax - 1.0 if full_range else -qmax), qmax


def fake_quantize_ref(x: torch.Tensor, group_size: int, bits: int, symmetric: bool, full_range: bool):
    """(out, scale, zero_point) over contiguous groups of the flattened x (the last one may be partial)."""
    n = x.numel()
    flat = x.reshape(-1).float()
    groups = -(-n // group_size)
    # zero padding changes no range: every range holds 0
    g = torch.nn.functional.pad(flat, (0, groups * group_size - n)).view(groups, group_size)
    qmin, qmax = grid(bits, full_range)
    nonfinite = ~torch.isfinite(g).all(1)
    safe = torch.where(torch.isfinite(g), g, torch.zeros_like(g))
    low = safe.amin(1).clamp(max=0) if groups else safe.new_zeros(0)
    high = safe.amax(1).clamp(min=0) if groups else safe.new_zeros(0)
    if symmetric:
        denominator = (qmax - qmin) / 2 if full_range else qmax
        scale = torch.maximum(-low, high) / denominator
        zero_point = torch.zeros_like(scale)
    else:
        scale = (high - low) / (qmax - qmin)
        zp = torch.clamp(torch.round(qmin - low / scale), qmin, qmax)
        zero_point = torch.where(scale == 0, torch.zeros_like(zp), zp)
    inv = torch.where(scale == 0, torch.zeros_like(scale), 1.0 / scale)[:, None]
    scaled = torch.where(inv.isinf(), g / scale[:, None], g * inv)
    code = torch.clamp(torch.round(scaled) + zero_point[:, None], qmin, qmax)
    out = (code - zero_point[:, None]) * scale[:, None]
    out = torch.where(nonfinite[:, None], torch.full_like(out, float("nan")), out)
    if x.dtype == torch.float16:
        out = out.clamp(-65504.0, 65504.0)
    scale = torch.where(nonfinite, torch.full_like(scale, float("nan")), scale)
    zero_point = torch.where(nonfinite, torch.zeros_like(zero_point), zero_point)
    return out.reshape(-1)[:n].view(x.shape).to(x.dtype), scale, zero_point.to(torch.int32)


def lsq_ref(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, qmin: float, qmax: float, g: float):
    """LSQ/LSQ+ in plain autograd: round with a straight-through detach trick, the scale gradient scaled by g."""
    s = scale * g + (scale - scale * g).detach()  # value s, gradient g * d/ds
    v = (x - offset) / s
    rounded = v + (torch.round(v) - v).detach()
    return torch.clamp(rounded, qmin, qmax) * s + offset


# --- LSQ / LSQ+: the plain-torch formula the fused ops (bnbx.qat.fake_quantize_lsq) reproduce bit for bit
# (forward and grad_x; the scale and offset sums up to the summation order). It was bnbx's implementation
# before the fused kernels; benchmarks/bench_qat.py measures it as the peer.


def sum_to(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum ``t`` over the dimensions that were broadcast from ``shape``."""
    while t.dim() > len(shape):
        t = t.sum(0)
    dims = [i for i, size in enumerate(shape) if size == 1 and t.shape[i] != 1]
    return t.sum(dims, keepdim=True) if dims else t


def lsq_torch(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, qmin: float, qmax: float) -> torch.Tensor:
    """Forward: fp32 math (fp64 for fp64 x), one rounding to x.dtype."""
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    inv = 1.0 / scale.to(ct)
    code = torch.clamp(torch.round((x.to(ct) - offset.to(ct)) * inv), qmin, qmax)
    return (code * scale.to(ct) + offset.to(ct)).to(x.dtype)


def lsq_torch_backward(grad, x, scale, offset, qmin: float, qmax: float, grad_scale: float, sums_in_double=False):
    """(grad_x, grad_scale, grad_offset) of lsq_torch with LSQ's scale gradient times grad_scale.

    sums_in_double: add the fp32 terms in double and return the sums as double (the kernel's precision)
    instead of summing in the compute dtype and returning the parameters' dtypes."""
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    v = (x.to(ct) - offset.to(ct)) * (1.0 / scale.to(ct))
    below, above = v < qmin, v > qmax
    inside = ~(below | above)
    g = grad.to(ct)
    d_scale = torch.where(inside, torch.round(v) - v, torch.where(below, qmin, qmax))
    scale_terms, offset_terms = g * d_scale, g * (~inside)
    if sums_in_double:
        grad_s = sum_to(scale_terms.double(), scale.shape) * grad_scale
        return (g * inside).to(x.dtype), grad_s, sum_to(offset_terms.double(), offset.shape)
    grad_s = sum_to(scale_terms, scale.shape) * grad_scale
    grad_o = sum_to(offset_terms, offset.shape)
    return (g * inside).to(x.dtype), grad_s.to(scale.dtype), grad_o.to(offset.dtype)


class LsqTorch(torch.autograd.Function):
    """lsq_torch with lsq_torch_backward as its gradient: the previous implementation, as a differentiable peer."""

    @staticmethod
    def forward(ctx, x, scale, offset, qmin, qmax, grad_scale):
        ctx.args = (qmin, qmax, grad_scale)
        ctx.save_for_backward(x, scale, offset)
        return lsq_torch(x, scale, offset, qmin, qmax)

    @staticmethod
    def backward(ctx, grad):
        x, scale, offset = ctx.saved_tensors
        return (*lsq_torch_backward(grad, x, scale, offset, *ctx.args), None, None, None)
