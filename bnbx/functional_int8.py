"""LLM.int8() functional API with bitsandbytes' names, signatures and results (``bnbx.functional.int8_*``).

Vector-wise (per row) int8 quantization with outlier columns, the exact int8 GEMM, its dequantizing epilogue,
and the fused mixed-precision layer op. The rules are bitsandbytes' (``bitsandbytes.functional``, default
backend), held to bit for bit in ``tests/test_int8_matmul.py``:

- ``stats[row] = max |x|`` over the row's values with ``|x| < threshold`` (all values when ``threshold == 0``);
  ``q = round_half_even(x * (127 / stats))`` with ``127 / stats`` computed as torch does, ``(1 / stats) * 127``.
- ``threshold > 0``: every column holding any ``|x| >= threshold`` (compared in the input's dtype) is an
  outlier column; its ``q`` is 0 in every row.
- ``int8_mm_dequant``: ``float(C) * (row_stats * col_stats) * 6.200124e-05 (+ bias)``.

Unlike bitsandbytes, every dtype is native (no cast to fp16, so bf16/fp32 values above 65504 stay finite), a
zero row gives zeros, and a row holding NaN or Inf gives ``q = 0`` with a NaN / Inf statistic.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Optional

import torch

from . import _library

__all__ = [
    "int8_gemm_route",
    "int8_linear_matmul",
    "int8_mixed_linear",
    "int8_mm_dequant",
    "int8_pack_weight",
    "int8_vectorwise_dequant",
    "int8_vectorwise_quant",
]


def _check_tensor(op: str, name: str, value) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if value.device.type not in ("cpu", "cuda", "meta"):
        raise RuntimeError(f"{op}: tensors on {value.device.type} are not supported; use cpu or cuda")


def _check_threshold(op: str, threshold) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"{op}: threshold must be a number, got {type(threshold).__name__}")
    threshold = float(threshold)
    if not threshold >= 0.0:  # also catches NaN
        raise ValueError(f"{op}: threshold must be >= 0 (0 disables outlier columns), got {threshold}")
    return threshold


def int8_vectorwise_quant(A: torch.Tensor, threshold: float = 0.0):
    """Quantize each row of ``A`` (``[..., K]``, fp32/fp16/bf16) to int8 with its absmax, LLM.int8() style.

    Returns ``(q int8 like A, row_stats fp32 [rows], outlier_cols)``: ``outlier_cols`` is ``None`` when
    ``threshold == 0`` (as in bitsandbytes), else an int64 tensor of the input columns holding any
    ``|x| >= threshold`` (empty when there is none); those columns are 0 in ``q`` and their values do not
    count toward ``row_stats``.
    """
    op = "int8_vectorwise_quant"
    _check_tensor(op, "A", A)
    threshold = _check_threshold(op, threshold)
    q, stats, cols = torch.ops.bnbx.int8_vectorwise_quant(A, threshold)
    return q, stats, (cols if threshold > 0.0 else None)


def int8_vectorwise_dequant(A: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`int8_vectorwise_quant`: ``float(A) * stats[row] / 127`` as fp32, shaped like ``A``."""
    op = "int8_vectorwise_dequant"
    _check_tensor(op, "A", A)
    _check_tensor(op, "stats", stats)
    return torch.ops.bnbx.int8_vectorwise_dequant(A, stats)


def int8_linear_matmul(
    A: torch.Tensor, B: torch.Tensor, out: Optional[torch.Tensor] = None, dtype: torch.dtype = torch.int32
) -> torch.Tensor:
    """Exact int8 product ``A @ B.T``: ``A`` int8 ``[..., K]``, ``B`` int8 ``[N, K]`` -> int32 ``[..., N]``.

    CPU: AMX-INT8 tiles where the CPU has them (and at least 32 rows), AVX512-VNNI, AVX2 or scalar otherwise,
    chosen at run time (:func:`int8_gemm_route`). K is at most 2^17 - 1, so int32 sums cannot overflow.
    """
    op = "int8_linear_matmul"
    _check_tensor(op, "A", A)
    _check_tensor(op, "B", B)
    if dtype != torch.int32:
        raise ValueError(f"{op}: dtype must be torch.int32 (the product is exact in int32), got {dtype}")
    result = torch.ops.bnbx.int8_linear_matmul(A, B)
    if out is not None:
        if not isinstance(out, torch.Tensor) or out.dtype != torch.int32 or out.shape != result.shape:
            raise ValueError(f"{op}: out must be an int32 tensor of shape {list(result.shape)}")
        return out.copy_(result)
    return result


def int8_mm_dequant(
    A: torch.Tensor,
    row_stats: torch.Tensor,
    col_stats: torch.Tensor,
    out: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """``A * row_stats[:, None] * col_stats[None, :] / 127^2 + bias`` in one pass, rounded once to ``dtype``.

    ``A`` is the int32 product ``[..., N]``; the default ``dtype`` is float16, bitsandbytes' (fixed) output
    dtype; pass ``dtype=torch.bfloat16`` or ``torch.float32`` to keep large values finite.
    """
    op = "int8_mm_dequant"
    for name, value in (("A", A), ("row_stats", row_stats), ("col_stats", col_stats)):
        _check_tensor(op, name, value)
    if bias is not None:
        _check_tensor(op, "bias", bias)
    result = torch.ops.bnbx.int8_mm_dequant(A, row_stats, col_stats, dtype, bias)
    if out is not None:
        return out.copy_(result)
    return result


def int8_mixed_linear(
    A: torch.Tensor,
    CB: torch.Tensor,
    SCB: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    threshold: float = 0.0,
) -> torch.Tensor:
    """The LLM.int8() layer in one op: ``A @ dequant(CB, SCB).T + bias`` in ``A.dtype``.

    ``A`` ``[..., K]`` is quantized per row; with ``threshold > 0`` its outlier columns are multiplied in fp32
    with the matching dequantized weight columns and added in the same epilogue that scales the int32 product
    (the output is written once). Differentiable in ``A`` and ``bias`` (the int8 weight is frozen).
    """
    op = "int8_mixed_linear"
    for name, value in (("A", A), ("CB", CB), ("SCB", SCB)):
        _check_tensor(op, name, value)
    if bias is not None:
        _check_tensor(op, "bias", bias)
    threshold = _check_threshold(op, threshold)
    return torch.ops.bnbx.int8_mixed_linear(A, CB, SCB, bias, threshold)


def int8_pack_weight(CB: torch.Tensor) -> torch.Tensor:
    """The int8 weight ``CB [N, K]`` in the AMX tile layout (CPU with AVX-512), uint8: pass it with ``CB`` to
    ``bnbx.matmul_8bit(..., packed_CB=)`` so large-M calls skip packing the weight. ``Linear8bitLt`` does this
    itself and keeps the copy (``N x K`` more bytes) while the weight is unchanged."""
    op = "int8_pack_weight"
    _check_tensor(op, "CB", CB)
    return torch.ops.bnbx.int8_pack_weight(CB)


@functools.lru_cache(maxsize=None)
def _gemm_handle() -> ctypes.CDLL:
    handle = _library.load()
    handle.bnbx_int8_gemm_route.restype = ctypes.c_char_p
    handle.bnbx_set_int8_gemm.argtypes = [ctypes.c_char_p]
    handle.bnbx_set_int8_gemm.restype = ctypes.c_int
    return handle


def int8_gemm_route() -> str:
    """The CPU int8 GEMM used for large M in this process: ``"amx"``, ``"avx512_vnni"``, ``"avx512"``, ``"avx2"``
    or ``"scalar"`` (below 32 rows AMX hands over to VNNI, which reads B in place)."""
    return _gemm_handle().bnbx_int8_gemm_route().decode()


def _force_int8_gemm(route: str) -> None:
    """Tests and benchmarks: force ``"amx"``, ``"avx512_vnni"``, ``"base"`` (the active instruction set's plain
    kernel) or ``"auto"``. A route the CPU lacks falls back to ``"base"``."""
    if not _gemm_handle().bnbx_set_int8_gemm(route.encode()):
        raise ValueError(f"unknown int8 GEMM route {route!r}")
