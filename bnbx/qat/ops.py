"""Fake quantization for QAT: integer MinMax (fused kernel), LSQ/LSQ+ (learned scale and offset) and NF4/FP4.

Every function here returns exactly what the deployable format gives back: ``fake_quantize`` with 8 bits equals
``bnbx.dequantize_int8(*bnbx.quantize_int8(x))`` bit for bit, and ``fake_quantize_4bit`` equals
``bnbx.dequantize_4bit(*bnbx.quantize_4bit(x))``. Gradients are straight-through (optionally masked); LSQ
scales get the LSQ step-size gradient.
"""

from __future__ import annotations

import math
from typing import Literal, Optional

import torch

from .. import _checks, _formats, _ops_qat

Granularity = Literal["tensor", "channel", "token", "group"]
GRANULARITIES = ("tensor", "channel", "token", "group")
RANGES = ("restricted", "full")


def _check_bits(op: str, bits: int) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 8:
        raise ValueError(f"{op}: bits must be from 2 to 8, got {bits!r}")


def group_layout(
    op: str, x: torch.Tensor, granularity: str, axis: int = 0, group_size: int = 128
) -> tuple[torch.Tensor, int, tuple[int, ...]]:
    """Rearrange ``x`` so every group of one scale is contiguous: returns (view, group size, scale shape).

    ``tensor``: one group. ``channel``: one group per index of ``axis`` (``x.movedim(axis, 0)``). ``token``:
    one per row of the last dimension. ``group``: ``group_size`` consecutive elements of the last dimension,
    which it must divide. The same layout as :func:`bnbx.quantize_int8`.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"{op}: granularity must be 'tensor', 'channel', 'token' or 'group', got {granularity!r}")
    if granularity == "tensor":
        return x, max(x.numel(), 1), ()
    if x.dim() == 0:
        raise ValueError(f"{op}: granularity {granularity!r} needs a tensor with at least one dimension")
    if granularity == "channel":
        if not isinstance(axis, int) or not -x.dim() <= axis < x.dim():
            raise ValueError(f"{op}: axis {axis!r} is out of range for a {x.dim()}-D tensor")
        moved = x.movedim(axis, 0)
        channels = moved.shape[0]
        return moved, max(x.numel() // channels, 1) if channels else 1, (channels,)
    if granularity == "token":
        return x, max(x.shape[-1], 1), tuple(x.shape[:-1])
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        raise ValueError(f"{op}: group_size must be a positive integer, got {group_size!r}")
    if x.shape[-1] % group_size:
        raise ValueError(f"{op}: group_size {group_size} does not divide the last dimension ({x.shape[-1]})")
    return x, group_size, tuple(x.shape[:-1]) + (x.shape[-1] // group_size,)


def fake_quantize(
    x: torch.Tensor,
    bits: int = 8,
    symmetric: bool = True,
    granularity: Granularity = "tensor",
    axis: int = 0,
    group_size: int = 128,
    range: Literal["restricted", "full"] = "restricted",
    mask: Literal["none", "range", "absolute"] = "none",
    clip: float = 2.0,
    return_params: bool = False,
):
    """Quantize and dequantize ``x`` with dynamic MinMax scales, in one fused pass per group.

    Args:
        x: fp32, fp16 or bf16 tensor (CPU or CUDA).
        bits: 2 to 8.
        symmetric: absmax scaling with zero point 0; else a zero point over ``[min(x, 0), max(x, 0)]``.
        granularity: ``"tensor"``, ``"channel"`` (per index of ``axis``; ``axis=0`` is per output row of a
            weight), ``"token"`` (per row of the last dimension) or ``"group"`` (``group_size`` consecutive
            elements of the last dimension).
        range: ``"restricted"``: codes in ``+-(2^(b-1)-1)``, symmetric scale ``absmax / (2^(b-1)-1)`` (LLM-QAT,
            bnbx int8); ``"full"``: codes in ``[-2^(b-1), 2^(b-1)-1]``, symmetric scale
            ``absmax / (2^(b-1) - 0.5)`` (torchao's convention; the positive maximum may be clipped by one step).
        mask: the straight-through gradient's mask: ``"none"`` (plain STE), ``"range"`` (no gradient where the
            code was clamped, relative to the scale) or ``"absolute"`` (no gradient where ``|x| >= clip``, LLM-QAT).
        return_params: also return ``(scale, zero_point)`` shaped per group.

    Rounding is half to even of ``x * (1 / scale)``; values are ``(q - zero_point) * scale`` in fp32, rounded once
    to ``x.dtype``. A group with NaN or Inf becomes NaN; a zero-range group gives zeros (no NaN).
    """
    op = "fake_quantize"
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: x must be a torch.Tensor, got {type(x).__name__}")
    _check_bits(op, bits)
    if range not in RANGES:
        raise ValueError(f"{op}: range must be 'restricted' or 'full', got {range!r}")
    layout, size, stats_shape = group_layout(op, x, granularity, axis, group_size)
    out, scale, zero_point = torch.ops.bnbx.fake_quantize(
        layout, size, bits, bool(symmetric), range == "full", mask, float(clip)
    )
    if granularity == "channel":
        out = out.movedim(0, axis)
    if return_params:
        return out, scale.reshape(stats_shape), zero_point.reshape(stats_shape)
    return out


# --- LSQ / LSQ+ ---------------------------------------------------------------------------------------------


def fake_quantize_lsq(
    x: torch.Tensor,
    scale: torch.Tensor,
    offset: Optional[torch.Tensor] = None,
    bits: int = 4,
    range: Literal["restricted", "full"] = "restricted",
    grad_scale: Optional[float] = None,
) -> torch.Tensor:
    """LSQ (learned step size) fake quantization; LSQ+ when ``offset`` is given. One fused op forward
    (``torch.ops.bnbx.fake_quantize_lsq``: one read of ``x``, one write) and one backward.

    ``out = clamp(round((x - offset) * (1 / scale)), qmin, qmax) * scale + offset``, computed in fp32 (in fp64
    for fp64 ``x``) and rounded once to ``x.dtype``; rounding is half to even (``torch.round``), a NaN ``x``
    gives NaN. ``scale`` (and ``offset``) hold one value, or one per row of ``x``: ``x``'s leading sizes
    followed by ones, e.g. ``[out_features, 1]`` per output channel of a weight or ``[batch, tokens, 1]`` per
    token; other shapes raise ``ValueError``.

    Gradients: ``x`` gets the straight-through gradient inside the grid and none outside; the scale gets LSQ's
    (``round(v) - v`` inside, ``qmin`` below, ``qmax`` above, summed per row or per tensor) multiplied by
    ``grad_scale`` (default ``1 / sqrt(x.numel() * qmax)``); ``offset`` gets the gradient summed outside the
    grid. The sums run in double in an order fixed by the shape: the same bits for any thread count.

    Args:
        x: fp32, fp16, bf16 or fp64 tensor (CPU or CUDA).
        scale: positive, finite step sizes (any float dtype; the gradient comes back in that dtype).
        offset: LSQ+'s learned offset (default: 0, no offset).
        bits: 2 to 8; ``range``: ``"restricted"`` (``+-(2^(b-1)-1)``) or ``"full"`` (``[-2^(b-1), 2^(b-1)-1]``).

    Raises:
        TypeError: a non-tensor or a non-float dtype. ValueError: ``bits``/``range`` out of range, a ``scale`` or
        ``offset`` shape other than the above, and (checked by the CPU kernel, which reads one value per row)
        a scale that is zero, negative, NaN or infinite, or a non-finite offset. On CUDA those values are not
        checked (that would synchronize every call): the rows they touch come out NaN or meaningless.
    """
    op = "fake_quantize_lsq"
    for name, t in (("x", x), ("scale", scale), ("offset", offset)):
        if not isinstance(t, torch.Tensor) and not (name == "offset" and t is None):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    _check_bits(op, bits)
    if range not in RANGES:
        raise ValueError(f"{op}: range must be 'restricted' or 'full', got {range!r}")
    qmin, qmax = _ops_qat.fake_quant_grid(bits, range == "full")
    if grad_scale is None:
        grad_scale = 1.0 / math.sqrt(max(x.numel(), 1) * qmax)
    if offset is None:
        offset = torch.zeros((), dtype=scale.dtype, device=scale.device)
    _ops_qat.check_fake_quantize_lsq_args(op, x, scale, offset, qmin, qmax)
    return torch.ops.bnbx.fake_quantize_lsq(x, scale, offset, qmin, qmax, float(grad_scale))


def lsq_init_scale(
    x: torch.Tensor,
    bits: int,
    granularity: Granularity = "channel",
    init: Literal["minmax", "mean"] = "minmax",
    range: Literal["restricted", "full"] = "restricted",
) -> torch.Tensor:
    """Initial LSQ scale, shaped to broadcast against ``x`` (``[rows, 1]`` per channel, ``[1]`` per tensor).

    ``"minmax"``: ``absmax / qmax`` (the MinMax grid, where QAT starts from RTN); ``"mean"``: LSQ's
    ``2 * mean|x| / sqrt(qmax)``. Zero scales are raised to 1e-8 so the first step has a finite reciprocal.
    """
    _check_bits("lsq_init_scale", bits)
    if granularity not in ("tensor", "channel"):
        raise ValueError(f"lsq_init_scale: granularity must be 'tensor' or 'channel', got {granularity!r}")
    _, qmax = _ops_qat.fake_quant_grid(bits, range == "full")
    a = x.detach().float().abs()
    if granularity == "channel":
        a = a.reshape(a.shape[0], -1)
        stat = a.amax(1, keepdim=True) / qmax if init == "minmax" else 2 * a.mean(1, keepdim=True) / math.sqrt(qmax)
        stat = stat.reshape((x.shape[0],) + (1,) * (x.dim() - 1))
    else:
        stat = (a.amax() / qmax if init == "minmax" else 2 * a.mean() / math.sqrt(qmax)).reshape(1)
    if init not in ("minmax", "mean"):
        raise ValueError(f"lsq_init_scale: init must be 'minmax' or 'mean', got {init!r}")
    return stat.clamp_min(1e-8)


# --- NF4 / FP4 ----------------------------------------------------------------------------------------------


@torch.library.custom_op("bnbx::fake_quantize_4bit", mutates_args=())
def _fake_quantize_4bit(x: torch.Tensor, blocksize: int, quant_type: str) -> torch.Tensor:
    packed, absmax = torch.ops.bnbx.quantize_4bit(x, blocksize, quant_type, torch.uint8)
    return torch.ops.bnbx.dequantize_4bit(packed, absmax, blocksize, quant_type, list(x.shape), x.dtype)


@_fake_quantize_4bit.register_fake
def _(x, blocksize, quant_type):
    _checks.check_float_dtype("fake_quantize_4bit", "x", x.dtype)
    _checks.check_blocksize("fake_quantize_4bit", blocksize)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


_fake_quantize_4bit.register_autograd(lambda ctx, grad: (grad, None, None))


def fake_quantize_4bit(x: torch.Tensor, quant_type: Literal["nf4", "fp4"] = "nf4", blocksize: int = 64) -> torch.Tensor:
    """NF4/FP4 fake quantization through bnbx's 4-bit kernels (blockwise absmax over the flattened tensor),
    with a straight-through gradient: exactly ``dequantize_4bit(*quantize_4bit(x, blocksize, quant_type))``."""
    if quant_type not in _formats.QUANT_TYPES:
        raise ValueError(f"fake_quantize_4bit: quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    return torch.ops.bnbx.fake_quantize_4bit(x, blocksize, quant_type)
