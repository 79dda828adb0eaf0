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
