"""bitsandbytes-style functional API over the ``torch.ops.bnbx`` ops.

4-bit (NF4/FP4) and 8-bit blockwise storage with bitsandbytes' byte layout, and int8 absmax/zero-point
quantization per tensor, channel, token or group. Every function checks its arguments here, and the C++
kernels check them again before touching memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch

from . import _ops
from .quant_state import QuantState, canonical_code

__all__ = [
    "Int8QuantState",
    "create_dynamic_map",
    "dequantize_4bit",
    "dequantize_blockwise",
    "dequantize_fp4",
    "dequantize_int8",
    "dequantize_nf4",
    "get_4bit_type",
    "quantize_4bit",
    "quantize_blockwise",
    "quantize_fp4",
    "quantize_int8",
    "quantize_nf4",
]


def _check_device(op: str, tensor: torch.Tensor) -> None:
    # CUDA tensors with a CPU-only build reach a C++ kernel that says how to rebuild (csrc/ops.cpp)
    if tensor.device.type not in ("cpu", "cuda", "meta"):
        raise RuntimeError(f"{op}: tensors on {tensor.device.type} are not supported; use cpu or cuda")


def _check_input(op: str, A: torch.Tensor) -> None:
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"{op}: A must be a torch.Tensor, got {type(A).__name__}")
    _check_device(op, A)
    _ops.check_float_dtype(op, "A", A.dtype)


def get_4bit_type(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The fp32 code table (``[16]``, by nibble value) of ``"nf4"`` or ``"fp4"`` on ``device``."""
    return canonical_code(quant_type).to(device)


def _build_dynamic_map(signed: bool) -> torch.Tensor:
    # bitsandbytes' create_dynamic_map(signed, max_exponent_bits=7, total_bits=8): for exponent i = 0..6,
    # the 2^i midpoints of linspace(0.1, 1, 2^i + 1) scaled by 10^(i - 6), both signs; plus 0 and 1.
    # (Unsigned: the same with one more fraction bit and no negatives, as bitsandbytes builds it.)
    values: list[float] = []
    fraction_bits = 0 if signed else 1
    for exponent in range(7):
        boundaries = torch.linspace(0.1, 1, 2 ** (exponent + fraction_bits) + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        scaled = (10 ** (exponent - 6)) * means
        values += scaled.tolist()
        if signed:
            values += (-scaled).tolist()
    values += [0.0, 1.0]
    values += [0.0] * (256 - len(values))
    values.sort()
    return torch.tensor(values, dtype=torch.float32)


# Built once at import, so torch.compile sees a constant instead of tracing the construction.
_DYNAMIC_MAPS = {True: _build_dynamic_map(True), False: _build_dynamic_map(False)}


def create_dynamic_map(signed: bool = True, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 256-value 8-bit dynamic map of bitsandbytes (fp32, sorted): fine near 0, coarse near 1."""
    return _DYNAMIC_MAPS[bool(signed)].to(device, copy=True)


# --- 4-bit ---------------------------------------------------------------------------------------------------


def quantize_4bit(
    A: torch.Tensor,
    blocksize: int = 64,
    quant_type: Literal["nf4", "fp4"] = "nf4",
    compress_statistics: bool = False,
    quant_storage: torch.dtype = torch.uint8,
) -> tuple[torch.Tensor, QuantState]:
    """Quantize ``A`` to 4-bit NF4 or FP4 codes in blocks of ``blocksize`` elements.

    Args:
        A: fp32, fp16 or bf16 tensor of any shape (``n`` elements); non-contiguous input is copied first.
        blocksize: elements per absmax block, a power of two from 32 to 4096.
        quant_type: ``"nf4"`` (QLoRA's normal float) or ``"fp4"`` (bitsandbytes' 4-bit float).
        compress_statistics: double quantization: store the absmax values 8-bit (blocks of 256, mean
            subtracted), saving about 0.37 bits per parameter at blocksize 64.
        quant_storage: dtype of the packed tensor (uint8, or a 16/32-bit float view of the same bytes for FSDP).

    Returns:
        ``packed``: ``[ceil(ceil(n/2) / itemsize), 1]`` of ``quant_storage``; byte j holds element 2j in its high
        nibble and element 2j+1 in its low nibble, bitsandbytes' layout. ``quant_state``: a :class:`QuantState`.

    A block holding NaN or Inf gets a NaN absmax, so all of it dequantizes to NaN; an all-zero block gives
    exact zeros back.
    """
    _check_input("quantize_4bit", A)
    packed, absmax = torch.ops.bnbx.quantize_4bit(A, blocksize, quant_type, quant_storage)
    code = get_4bit_type(quant_type, A.device)
    if not compress_statistics:
        return packed, QuantState(absmax, A.shape, code, blocksize, quant_type, A.dtype)
    # Double quantization as in QLoRA: subtract the mean, 8-bit blockwise with the dynamic map, blocks of 256,
    # in one op. The mean skips NaN absmax values, so a NaN block (the NaN/Inf contract) spoils only its group
    # of 256 blocks.
    qabsmax, offset, state2 = _double_quantize(absmax, 256)
    return packed, QuantState(qabsmax, A.shape, code, blocksize, quant_type, A.dtype, offset=offset, state2=state2)


def _double_quantize(absmax: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor, QuantState]:
    """absmax -> (8-bit codes of absmax - offset, offset, the codes' QuantState), one bnbx::double_quantize call."""
    code = create_dynamic_map(signed=True, device=absmax.device)
    qabsmax, absmax2, offset = torch.ops.bnbx.double_quantize(absmax, code, blocksize)
    return qabsmax, offset, QuantState(absmax2, absmax.shape, code, blocksize, "dynamic", absmax.dtype)


def dequantize_4bit(
    A: torch.Tensor,
    quant_state: Optional[QuantState] = None,
    absmax: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    blocksize: int = 64,
    quant_type: Literal["nf4", "fp4"] = "nf4",
) -> torch.Tensor:
    """Dequantize packed 4-bit codes to the original shape and dtype: ``code[q] * absmax[block]`` in fp32,
    rounded once to the output dtype.

    Args:
        A: packed codes from :func:`quantize_4bit`.
        quant_state: the state returned with them. Without one, pass ``absmax`` (fp32 per block) and ``out``
            (whose shape and dtype say what to produce), as bitsandbytes allows.
        out: optional contiguous output of the state's shape and dtype, written in place.
    """
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"dequantize_4bit: A must be a torch.Tensor, got {type(A).__name__}")
    _check_device("dequantize_4bit", A)
    if quant_state is None:
        if absmax is None or out is None:
            raise ValueError("dequantize_4bit: pass quant_state, or both absmax and out")
        shape, dtype = out.shape, out.dtype
    else:
        if not isinstance(quant_state, QuantState):
            raise TypeError(f"dequantize_4bit: quant_state must be a QuantState, got {type(quant_state).__name__}")
        absmax = quant_state.get_absmax()
        shape, dtype = quant_state.shape, quant_state.dtype
        blocksize, quant_type = quant_state.blocksize, quant_state.quant_type
    if out is None:
        return torch.ops.bnbx.dequantize_4bit(A, absmax, blocksize, quant_type, list(shape), dtype)
    torch.ops.bnbx.dequantize_4bit.out(A, absmax, blocksize, quant_type, list(shape), dtype, out=out)
    return out


def quantize_nf4(A: torch.Tensor, blocksize: int = 64, compress_statistics: bool = False,
                 quant_storage: torch.dtype = torch.uint8) -> tuple[torch.Tensor, QuantState]:
    """:func:`quantize_4bit` with ``quant_type="nf4"``."""
    return quantize_4bit(A, blocksize, "nf4", compress_statistics, quant_storage)


def quantize_fp4(A: torch.Tensor, blocksize: int = 64, compress_statistics: bool = False,
                 quant_storage: torch.dtype = torch.uint8) -> tuple[torch.Tensor, QuantState]:
    """:func:`quantize_4bit` with ``quant_type="fp4"``."""
    return quantize_4bit(A, blocksize, "fp4", compress_statistics, quant_storage)


def dequantize_nf4(A: torch.Tensor, quant_state: Optional[QuantState] = None, absmax: Optional[torch.Tensor] = None,
                   out: Optional[torch.Tensor] = None, blocksize: int = 64) -> torch.Tensor:
    """:func:`dequantize_4bit` for NF4 codes."""
    if quant_state is not None and quant_state.quant_type != "nf4":
        raise ValueError(f"dequantize_nf4: quant_state holds {quant_state.quant_type} codes")
    return dequantize_4bit(A, quant_state, absmax, out, blocksize, "nf4")


def dequantize_fp4(A: torch.Tensor, quant_state: Optional[QuantState] = None, absmax: Optional[torch.Tensor] = None,
                   out: Optional[torch.Tensor] = None, blocksize: int = 64) -> torch.Tensor:
    """:func:`dequantize_4bit` for FP4 codes."""
    if quant_state is not None and quant_state.quant_type != "fp4":
        raise ValueError(f"dequantize_fp4: quant_state holds {quant_state.quant_type} codes")
    return dequantize_4bit(A, quant_state, absmax, out, blocksize, "fp4")


# --- 8-bit blockwise -----------------------------------------------------------------------------------------


def quantize_blockwise(
    A: torch.Tensor, code: Optional[torch.Tensor] = None, blocksize: int = 4096, nested: bool = False
) -> tuple[torch.Tensor, QuantState]:
    """Quantize ``A`` to 8-bit codes (uint8, shaped like ``A``): the nearest value of ``code`` (default: the
    signed dynamic map) after scaling each block of ``blocksize`` elements by its absmax.

    ``nested=True`` quantizes the absmax values again (blocksize unchanged, mean subtracted), as bitsandbytes does.
    """
    _check_input("quantize_blockwise", A)
    if code is None:
        code = create_dynamic_map(signed=True, device=A.device)
    elif code.device.type != "cpu" and code.numel() == _ops.DYNAMIC_MAP_SIZE and code.dtype == torch.float32:
        # the CPU kernel checks the order itself; on a GPU check it here (one sync, only for a custom code)
        if not bool((code.reshape(-1)[1:] >= code.reshape(-1)[:-1]).all()):
            raise ValueError("quantize_blockwise: code must be sorted in increasing order")
    codes, absmax = torch.ops.bnbx.quantize_blockwise(A, code, blocksize)
    if not nested:
        return codes, QuantState(absmax, A.shape, code, blocksize, "dynamic", A.dtype)
    qabsmax, offset, state2 = _double_quantize(absmax, blocksize)
    return codes, QuantState(qabsmax, A.shape, code, blocksize, "dynamic", A.dtype, offset=offset, state2=state2)


def dequantize_blockwise(
    A: torch.Tensor,
    quant_state: Optional[QuantState] = None,
    absmax: Optional[torch.Tensor] = None,
    code: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    blocksize: int = 4096,
) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise`: ``code[q] * absmax[block]`` in fp32, rounded to the state's dtype
    (fp32 without a state). ``out``, if given, receives the result."""
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"dequantize_blockwise: A must be a torch.Tensor, got {type(A).__name__}")
    _check_device("dequantize_blockwise", A)
    dtype = torch.float32 if out is None else out.dtype
    if quant_state is not None:
        absmax, code = quant_state.get_absmax(), quant_state.code
        blocksize, dtype = quant_state.blocksize, quant_state.dtype
    elif absmax is None:
        raise ValueError("dequantize_blockwise: pass quant_state or absmax")
    if code is None:
        code = create_dynamic_map(signed=True, device=A.device)
    result = torch.ops.bnbx.dequantize_blockwise(A, absmax, code, blocksize, dtype)
    if out is None:
        return result
    return out.copy_(result)


# --- int8 absmax / zero-point ---------------------------------------------------------------------------------

Granularity = Literal["tensor", "channel", "token", "group"]


@dataclass
class Int8QuantState:
    """How an int8 tensor maps back to floats: ``x ~ (q - zero_point) * scale`` per group.

    Attributes:
        scale: fp32, one per group, shaped for the granularity: ``[]`` per tensor, ``[A.shape[axis]]`` per
            channel, ``A.shape[:-1]`` per token, ``A.shape[:-1] + [A.shape[-1] // group_size]`` per group.
        zero_point: int32, same shape as ``scale``; all zeros when symmetric.
        granularity, axis, group_size: how the groups were formed.
        symmetric: absmax scaling (q in [-127, 127]) or zero-point scaling (q in [-128, 127]).
        dtype: the original dtype.
    """

    scale: torch.Tensor
    zero_point: torch.Tensor
    granularity: Granularity
    axis: int
    group_size: int
    symmetric: bool
    dtype: torch.dtype


def _int8_layout(A: torch.Tensor, granularity: str, axis: int, group_size: int) -> tuple[torch.Tensor, int, tuple]:
    """Rearrange A so that every group is contiguous; returns (view, group_size, stats shape)."""
    if granularity == "tensor":
        return A, max(A.numel(), 1), ()
    if A.dim() == 0:
        raise ValueError(f"quantize_int8: granularity {granularity!r} needs a tensor with at least one dimension")
    if granularity == "channel":
        if not -A.dim() <= axis < A.dim():
            raise ValueError(f"quantize_int8: axis {axis} is out of range for a {A.dim()}-D tensor")
        moved = A.movedim(axis, 0)
        channels = moved.shape[0]
        return moved, max(A.numel() // channels, 1) if channels else 1, (channels,)
    if granularity == "token":
        return A, max(A.shape[-1], 1), tuple(A.shape[:-1])
    if granularity == "group":
        if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
            raise ValueError(f"quantize_int8: group_size must be a positive integer, got {group_size!r}")
        if A.shape[-1] % group_size:
            raise ValueError(
                f"quantize_int8: the last dimension ({A.shape[-1]}) must be a multiple of group_size ({group_size})"
            )
        return A, group_size, tuple(A.shape[:-1]) + (A.shape[-1] // group_size,)
    raise ValueError(f"quantize_int8: granularity must be 'tensor', 'channel', 'token' or 'group', got {granularity!r}")


def quantize_int8(
    A: torch.Tensor,
    granularity: Granularity = "tensor",
    symmetric: bool = True,
    axis: int = 0,
    group_size: int = 128,
) -> tuple[torch.Tensor, Int8QuantState]:
    """Quantize ``A`` to int8 with one scale (and zero point) per tensor, channel, token or group.

    Args:
        A: fp32, fp16 or bf16 tensor.
        granularity: ``"tensor"``; ``"channel"`` (one scale per index of ``axis``, e.g. per output row of a
            weight with ``axis=0``); ``"token"`` (one per row of the last dimension); ``"group"`` (contiguous
            groups of ``group_size`` along the last dimension, which it must divide).
        symmetric: absmax scaling, ``scale = absmax / 127``, ``q = round(x / scale)`` in [-127, 127]; else
            zero-point (asymmetric) scaling over ``[min(x, 0), max(x, 0)]``, ``scale = range / 255``,
            ``q = clamp(round(x / scale) + zero_point, -128, 127)``. Rounding is half to even; ``x / scale`` is
            computed as ``x * (1 / scale)``, as torch's fake-quantize does.

    Returns:
        ``q`` (int8, shaped like ``A``) and an :class:`Int8QuantState`. A group with NaN or Inf gets a NaN
        scale (it dequantizes to NaN); an all-zero group gets scale 0 and exact zeros back. fp16 output of
        :func:`dequantize_int8` saturates at +-65504 (zero-point rounding can rebuild half a step past the maximum).
    """
    _check_input("quantize_int8", A)
    layout, size, stats_shape = _int8_layout(A, granularity, axis, group_size)
    if A.numel() == 0:
        # nothing to quantize; the (unused) statistics still get their documented shape
        q = torch.empty(A.shape, dtype=torch.int8, device=A.device)
        scale = torch.zeros(stats_shape, dtype=torch.float32, device=A.device)
        zero_point = torch.zeros(stats_shape, dtype=torch.int32, device=A.device)
    else:
        q, scale, zero_point = torch.ops.bnbx.quantize_int8(layout, size, bool(symmetric))
    if granularity == "channel" and A.numel():
        q = q.movedim(0, axis).contiguous()
    state = Int8QuantState(
        scale.reshape(stats_shape), zero_point.reshape(stats_shape), granularity,
        axis, size if granularity == "group" else group_size, bool(symmetric), A.dtype,
    )
    return q, state


def dequantize_int8(q: torch.Tensor, state: Int8QuantState, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Inverse of :func:`quantize_int8`: ``(q - zero_point) * scale`` in fp32, rounded to ``dtype`` (default:
    the original dtype)."""
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"dequantize_int8: q must be a torch.Tensor, got {type(q).__name__}")
    _check_device("dequantize_int8", q)
    dtype = state.dtype if dtype is None else dtype
    layout, size, stats_shape = _int8_layout(q, state.granularity, state.axis, state.group_size)
    if tuple(state.scale.shape) != stats_shape:
        raise ValueError(
            f"dequantize_int8: scale has shape {list(state.scale.shape)} but q of shape {list(q.shape)} "
            f"needs {list(stats_shape)} for granularity {state.granularity!r}"
        )
    if q.numel() == 0:
        return torch.empty(q.shape, dtype=dtype, device=q.device)
    out = torch.ops.bnbx.dequantize_int8(layout, state.scale.reshape(-1), state.zero_point.reshape(-1), size, dtype)
    if state.granularity == "channel":
        out = out.movedim(0, state.axis).contiguous()
    return out


