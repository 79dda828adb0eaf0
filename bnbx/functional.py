"""bitsandbytes-style functional API over the ``torch.ops.bnbx`` ops.

4-bit (NF4/FP4) and 8-bit blockwise storage with bitsandbytes' byte layout, and int8 absmax/zero-point
quantization per tensor, channel, token or group. Every function checks its arguments here, and the C++
kernels check them again before touching memory.

Every name shared with ``bitsandbytes.functional`` takes the same parameters with the same defaults (e.g.
``quantize_4bit`` defaults to FP4, as bitsandbytes does), so swapping the import never changes results;
``tests/test_parity.py`` compares the signatures and README.md lists the deliberate differences. bnbx's
recommendation for new 4-bit weights is ``quant_type="nf4"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch

from . import _checks, _formats
from ._formats import (
    canonical_code,
    create_dynamic_map,
    create_fp8_map,
    create_linear_map,
    create_normal_map,
)
from .quant_state import QuantState, as_quant_state

__all__ = [
    "Int8QuantState",
    "QuantState",
    "canonical_code",
    "create_dynamic_map",
    "create_fp8_map",
    "create_linear_map",
    "create_normal_map",
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

_DEFAULT_4BIT_BLOCKSIZE = 64  # what blocksize=None means, as in bitsandbytes


def _check_device(op: str, tensor: torch.Tensor) -> None:
    # CUDA tensors with a CPU-only build reach a C++ kernel that says how to rebuild (csrc/ops.cpp)
    if tensor.device.type not in ("cpu", "cuda", "meta"):
        raise RuntimeError(f"{op}: tensors on {tensor.device.type} are not supported; use cpu or cuda")


def _check_tensor(op: str, name: str, value: Any) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    _check_device(op, value)


def _check_input(op: str, A: torch.Tensor) -> None:
    _check_tensor(op, "A", A)
    _checks.check_float_dtype(op, "A", A.dtype)


def _check_blocksize(op: str, blocksize: Any, allowed: tuple[int, ...]) -> int:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int):
        raise TypeError(f"{op}: blocksize must be an int, got {type(blocksize).__name__}")
    _checks.check_blocksize(op, blocksize, allowed)
    return blocksize


def _check_quant_type(op: str, quant_type: Any) -> str:
    if not isinstance(quant_type, str):
        raise TypeError(f"{op}: quant_type must be a str, got {type(quant_type).__name__}")
    _checks.check_quant_type(op, quant_type)
    return quant_type


def _write_into(op: str, name: str, dest: Optional[torch.Tensor], result: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' ``out=``/``absmax=`` arguments: copy ``result`` into ``dest``, which must match it."""
    if dest is None:
        return result
    _check_tensor(op, name, dest)
    if dest.shape != result.shape or dest.dtype != result.dtype or dest.device != result.device:
        raise ValueError(
            f"{op}: {name} must have shape {list(result.shape)}, dtype {_formats.dtype_name(result.dtype)} and "
            f"device {result.device}, got {list(dest.shape)}, {_formats.dtype_name(dest.dtype)} and {dest.device}"
        )
    return dest.copy_(result)


def get_4bit_type(typename: str, device: Optional[torch.device | str] = None, blocksize: int = 64) -> torch.Tensor:
    """The fp32 ``[16]`` table by nibble value of ``"nf4"``, ``"fp4"``, ``"int4"`` or ``"af4"`` (blocksize 64).

    ``device=None`` means CUDA when it is available, else the CPU (bitsandbytes always means CUDA).
    Only nf4 and fp4 have bnbx kernels; the others are tables.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return _formats.four_bit_table(typename, blocksize).to(device)


# Tables per (kind, device), made once and shared by every call: copying one from the host per call would make
# each CUDA call wait for the GPU (a synchronisation) and could not be captured in a CUDA graph. The CUDA copy
# is taken from pinned memory without blocking, so even the first call does not synchronise. The QuantStates
# of the ops hold these tensors: they are never modified in place.
_TABLES: dict[tuple[str, torch.device], torch.Tensor] = {}


def _table(kind: str, device: torch.device | str) -> torch.Tensor:
    """The code table ``kind`` ("nf4", "fp4" or "dynamic") on ``device``, cached."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    table = _TABLES.get((kind, device))
    if table is None:
        host = _formats.DYNAMIC_MAP if kind == "dynamic" else _formats.canonical_code(kind)
        if device.type == "cuda":
            table = host.pin_memory().to(device, non_blocking=True)
        else:
            table = host.to(device, copy=True)
        _TABLES[(kind, device)] = table
    return table


# --- 4-bit ---------------------------------------------------------------------------------------------------


def quantize_4bit(
    A: torch.Tensor,
    absmax: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    blocksize: Optional[int] = None,
    compress_statistics: bool = False,
    quant_type: Literal["nf4", "fp4"] = "fp4",
    quant_storage: torch.dtype = torch.uint8,
) -> tuple[torch.Tensor, QuantState]:
    """Quantize ``A`` to 4-bit NF4 or FP4 codes in blocks of ``blocksize`` elements.

    Args:
        A: fp32, fp16 or bf16 tensor of any shape (``n`` elements); non-contiguous input is copied first.
        absmax, out: optional tensors that receive the (state's) absmax and the packed codes; they must have
            the shape and dtype of what is returned (bitsandbytes' arguments).
        blocksize: elements per absmax block, a power of two from 32 to 4096; ``None`` means 64.
        compress_statistics: double quantization: store the absmax values 8-bit (blocks of 256, mean
            subtracted), saving about 0.37 bits per parameter at blocksize 64.
        quant_type: ``"fp4"`` (the default, as bitsandbytes) or ``"nf4"`` (QLoRA's normal float, bnbx's
            recommendation for weights: lower error on normally distributed values).
        quant_storage: dtype of the packed tensor (uint8, or a 16/32-bit float view of the same bytes for FSDP).

    Returns:
        ``packed``: ``[ceil(ceil(n/2) / itemsize), 1]`` of ``quant_storage``; byte j holds element 2j in its high
        nibble and element 2j+1 in its low nibble, bitsandbytes' layout. ``quant_state``: a :class:`QuantState`.

    A block holding NaN or Inf gets a NaN absmax, so all of it dequantizes to NaN; an all-zero block gives
    exact zeros back.
    """
    op = "quantize_4bit"
    _check_input(op, A)
    blocksize = _check_blocksize(op, _DEFAULT_4BIT_BLOCKSIZE if blocksize is None else blocksize, _formats.BLOCKSIZES)
    quant_type = _check_quant_type(op, quant_type)
    packed, stats = torch.ops.bnbx.quantize_4bit(A, blocksize, quant_type, quant_storage)
    code = _table(quant_type, A.device)
    if not compress_statistics:
        state = QuantState(stats, A.shape, code, blocksize, quant_type, A.dtype)
    else:
        # Double quantization as in QLoRA: subtract the mean, 8-bit blockwise with the dynamic map, blocks of
        # 256, in one op. The mean skips NaN absmax values, so a NaN block (the NaN/Inf contract) spoils only
        # its group of 256 blocks.
        qabsmax, offset, state2 = _double_quantize(stats, _formats.NESTED_BLOCKSIZE)
        state = QuantState(qabsmax, A.shape, code, blocksize, quant_type, A.dtype, offset=offset, state2=state2)
    packed = _write_into(op, "out", out, packed)
    state.absmax = _write_into(op, "absmax", absmax, state.absmax)
    return packed, state


def _double_quantize(absmax: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor, QuantState]:
    """absmax -> (8-bit codes of absmax - offset, offset, the codes' QuantState), one bnbx::double_quantize call."""
    code = _table("dynamic", absmax.device)
    qabsmax, absmax2, offset = torch.ops.bnbx.double_quantize(absmax, code, blocksize)
    state2 = QuantState(absmax2, absmax.shape, code, blocksize, _formats.BLOCKWISE_QUANT_TYPE, absmax.dtype)
    return qabsmax, offset, state2


def dequantize_4bit(
    A: torch.Tensor,
    quant_state: Optional[QuantState] = None,
    absmax: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    blocksize: Optional[int] = None,
    quant_type: Literal["nf4", "fp4"] = "fp4",
) -> torch.Tensor:
    """Dequantize packed 4-bit codes to the original shape and dtype: ``code[q] * absmax[block]`` in fp32,
    rounded once to the output dtype.

    Args:
        A: packed codes from :func:`quantize_4bit`.
        quant_state: the state returned with them (a bnbx or a bitsandbytes QuantState). Without one, pass
            ``absmax`` (fp32 per block) and ``out`` (whose shape and dtype say what to produce), and
            ``blocksize`` (``None``: 64) and ``quant_type``, as bitsandbytes allows.
        out: optional contiguous output of the state's shape and dtype, written in place.

    Unlike bitsandbytes, a packed tensor with one row (``[1, k]``) does not give a transposed result: the
    output always has the state's shape.
    """
    op = "dequantize_4bit"
    _check_tensor(op, "A", A)
    if quant_state is None:
        if absmax is None or out is None:
            raise ValueError(f"{op}: pass quant_state, or both absmax and out")
        _check_tensor(op, "absmax", absmax)
        _check_tensor(op, "out", out)
        shape, dtype = out.shape, out.dtype
        blocksize = _DEFAULT_4BIT_BLOCKSIZE if blocksize is None else blocksize
        blocksize = _check_blocksize(op, blocksize, _formats.BLOCKSIZES)
        quant_type = _check_quant_type(op, quant_type)
    else:
        state = as_quant_state(op, quant_state)
        if state.shape is None or state.dtype is None:
            raise ValueError(f"{op}: quant_state must record shape and dtype")
        blocksize = _check_blocksize(op, state.blocksize, _formats.BLOCKSIZES)
        quant_type = _check_quant_type(op, state.quant_type)
        absmax = state.get_absmax()
        shape, dtype = state.shape, state.dtype
    if out is None:
        return torch.ops.bnbx.dequantize_4bit(A, absmax, blocksize, quant_type, list(shape), dtype)
    torch.ops.bnbx.dequantize_4bit.out(A, absmax, blocksize, quant_type, list(shape), dtype, out=out)
    return out


def quantize_nf4(
    A: torch.Tensor,
    absmax: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    blocksize: Optional[int] = None,
    compress_statistics: bool = False,
    quant_storage: torch.dtype = torch.uint8,
) -> tuple[torch.Tensor, QuantState]:
    """:func:`quantize_4bit` with ``quant_type="nf4"``."""
    return quantize_4bit(A, absmax, out, blocksize, compress_statistics, "nf4", quant_storage)


def quantize_fp4(
    A: torch.Tensor,
    absmax: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    blocksize: Optional[int] = None,
    compress_statistics: bool = False,
    quant_storage: torch.dtype = torch.uint8,
) -> tuple[torch.Tensor, QuantState]:
    """:func:`quantize_4bit` with ``quant_type="fp4"``."""
    return quantize_4bit(A, absmax, out, blocksize, compress_statistics, "fp4", quant_storage)


def _dequantize_typed(op: str, quant_type: str, A, quant_state, absmax, out, blocksize) -> torch.Tensor:
    if quant_state is not None:
        quant_state = as_quant_state(op, quant_state)
        if quant_state.quant_type != quant_type:
            raise ValueError(f"{op}: quant_state holds {quant_state.quant_type} codes, not {quant_type}")
    return dequantize_4bit(A, quant_state, absmax, out, blocksize, quant_type)


def dequantize_nf4(
    A: torch.Tensor,
    quant_state: Optional[QuantState] = None,
    absmax: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    blocksize: Optional[int] = None,
) -> torch.Tensor:
    """:func:`dequantize_4bit` for NF4 codes (a state holding FP4 codes is an error)."""
    return _dequantize_typed("dequantize_nf4", "nf4", A, quant_state, absmax, out, blocksize)


def dequantize_fp4(
    A: torch.Tensor,
    quant_state: Optional[QuantState] = None,
    absmax: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    blocksize: Optional[int] = None,
) -> torch.Tensor:
    """:func:`dequantize_4bit` for FP4 codes (a state holding NF4 codes is an error)."""
    return _dequantize_typed("dequantize_fp4", "fp4", A, quant_state, absmax, out, blocksize)


# --- 8-bit blockwise -----------------------------------------------------------------------------------------


def _check_code(op: str, code: Any, device: torch.device) -> torch.Tensor:
    _check_tensor(op, "code", code)
    _checks.check_code(op, code)
    code = code.reshape(-1).to(device)
    if code.device.type != "cpu" and code.device.type != "meta":
        # the CPU kernel checks the order itself; on a GPU check it here (one sync, only for a custom code)
        if not bool((code[1:] >= code[:-1]).all()):
            raise ValueError(f"{op}: code must be sorted in increasing order")
    return code


def quantize_blockwise(
    A: torch.Tensor,
    code: Optional[torch.Tensor] = None,
    absmax: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    blocksize: int = 4096,
    nested: bool = False,
) -> tuple[torch.Tensor, QuantState]:
    """Quantize ``A`` to 8-bit codes (uint8, shaped like ``A``): the nearest value of ``code`` after scaling
    each block of ``blocksize`` elements (a power of two from 32 to 16384) by its absmax.

    Args:
        code: 256 sorted fp32 values (default: the signed dynamic map); few-bit maps from
            :func:`create_dynamic_map`, :func:`create_fp8_map`, :func:`create_linear_map` or
            :func:`create_normal_map` (``total_bits`` < 8) pad with zeros and work too.
        absmax, out: optional tensors that receive the (state's) absmax and the codes (bitsandbytes' arguments).
        nested: quantize the absmax values again (same blocksize, mean subtracted), as bitsandbytes does.
    """
    op = "quantize_blockwise"
    _check_input(op, A)
    blocksize = _check_blocksize(op, blocksize, _formats.BLOCKSIZES_8BIT)
    if code is None:
        code = _table("dynamic", A.device)
    else:
        code = _check_code(op, code, A.device).clone()
    codes, stats = torch.ops.bnbx.quantize_blockwise(A, code, blocksize)
    if not nested:
        state = QuantState(stats, A.shape, code, blocksize, _formats.BLOCKWISE_QUANT_TYPE, A.dtype)
    else:
        qabsmax, offset, state2 = _double_quantize(stats, blocksize)
        state = QuantState(
            qabsmax, A.shape, code, blocksize, _formats.BLOCKWISE_QUANT_TYPE, A.dtype, offset=offset, state2=state2
        )
    codes = _write_into(op, "out", out, codes)
    state.absmax = _write_into(op, "absmax", absmax, state.absmax)
    return codes, state


def dequantize_blockwise(
    A: torch.Tensor,
    quant_state: Optional[QuantState] = None,
    absmax: Optional[torch.Tensor] = None,
    code: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    blocksize: int = 4096,
    nested: bool = False,
) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise`: ``code[q] * absmax[block]`` in fp32, rounded to the state's dtype
    (fp32 without a state).

    ``quant_state`` is a bnbx or bitsandbytes QuantState; without one pass ``absmax`` (and ``code``,
    ``blocksize``). ``out``, if given, must have ``A``'s shape and the output dtype. ``nested`` is ignored,
    as in bitsandbytes: the state says whether its absmax is quantized.
    """
    op = "dequantize_blockwise"
    _check_tensor(op, "A", A)
    if quant_state is not None:
        state = as_quant_state(op, quant_state)
        if state.dtype is None or state.code is None:
            raise ValueError(f"{op}: quant_state must record code and dtype")
        blocksize = _check_blocksize(op, state.blocksize, _formats.BLOCKSIZES_8BIT)
        stats, code, dtype = state.get_absmax(), state.code, state.dtype
    elif absmax is None:
        raise ValueError(f"{op}: pass quant_state or absmax")
    else:
        _check_tensor(op, "absmax", absmax)
        blocksize = _check_blocksize(op, blocksize, _formats.BLOCKSIZES_8BIT)
        stats, dtype = absmax, torch.float32
    if code is None:
        code = _table("dynamic", A.device)
    else:
        _check_tensor(op, "code", code)
        code = code.to(A.device)
    result = torch.ops.bnbx.dequantize_blockwise(A, stats, code, blocksize, dtype)
    return _write_into(op, "out", out, result)


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
        scale.reshape(stats_shape),
        zero_point.reshape(stats_shape),
        granularity,
        axis,
        size if granularity == "group" else group_size,
        bool(symmetric),
        A.dtype,
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


# LLM.int8() ops live in functional_int8.py; bitsandbytes users find them here under the same names.
from .functional_int8 import (  # noqa: E402
    int8_linear_matmul,
    int8_mixed_linear,
    int8_mm_dequant,
    int8_pack_weight,
    int8_vectorwise_dequant,
    int8_vectorwise_quant,
)

__all__ += [
    "int8_linear_matmul",
    "int8_mixed_linear",
    "int8_mm_dequant",
    "int8_pack_weight",
    "int8_vectorwise_dequant",
    "int8_vectorwise_quant",
]
