"""Fake (meta) kernels for every ``torch.ops.bnbx`` op, so ``torch.compile`` and ``opcheck`` can trace them.

The schemas live in ``csrc/ops.cpp``. Each fake repeats the C++ checks of ``csrc/common/checks.h`` with the
same words (``tests/test_errors.py`` holds both to it), computes output shapes and dtypes with
``torch.empty`` on the input's device, and never reads data.

None of these ops is differentiable (quantization has no useful gradient here; fake-quant ops with a
straight-through estimator are separate), so none registers autograd.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ._formats import BLOCKSIZES, BLOCKSIZES_8BIT, DYNAMIC_MAP_SIZE, QUANT_STORAGES, QUANT_TYPES, SUPPORTED_FLOATS
from ._formats import dtype_name as _dtype_name


def check_float_dtype(op: str, name: str, dtype: torch.dtype) -> None:
    torch._check_type(
        dtype in SUPPORTED_FLOATS,
        lambda: f"{op}: {name} must be float32, float16 or bfloat16, got {_dtype_name(dtype)}",
    )


def check_blocksize(op: str, blocksize: int, allowed: tuple[int, ...] = BLOCKSIZES) -> None:
    """4-bit ops take ``BLOCKSIZES`` (32..4096), 8-bit blockwise ops ``BLOCKSIZES_8BIT`` (32..16384)."""
    torch._check_value(
        blocksize in allowed,
        lambda: f"{op}: blocksize must be a power of two from {allowed[0]} to {allowed[-1]}, got {blocksize}",
    )


def check_quant_type(op: str, quant_type: str) -> None:
    torch._check_value(
        quant_type in QUANT_TYPES, lambda: f"{op}: quant_type must be 'nf4' or 'fp4', got '{quant_type}'"
    )


def check_quant_storage(op: str, storage: torch.dtype) -> None:
    torch._check_type(
        storage in QUANT_STORAGES,
        lambda: f"{op}: quant_storage must be uint8, int8, float16, bfloat16 or float32, got {_dtype_name(storage)}",
    )


def checked_numel(op: str, shape: Sequence[int]) -> int:
    for size in shape:
        torch._check_value(size >= 0, lambda: f"{op}: shape must not hold negative sizes, got {list(shape)}")
    n = math.prod(shape)
    torch._check_value(n < 2**62, lambda: f"{op}: shape {list(shape)} has too many elements")
    return n


def check_same_device(op: str, a: torch.Tensor, a_name: str, b: torch.Tensor, b_name: str) -> None:
    torch._check(
        a.device == b.device,
        lambda: f"{op}: expected all tensors on the same device, got {a_name} on {a.device} and {b_name} on {b.device}",
    )


def check_block_stats(op: str, name: str, stats: torch.Tensor, expected: int, dtype=torch.float32) -> None:
    torch._check_type(
        stats.dtype == dtype, lambda: f"{op}: {name} must be {_dtype_name(dtype)}, got {_dtype_name(stats.dtype)}"
    )
    torch._check_value(
        stats.numel() == expected,
        lambda: f"{op}: {name} must hold one value per block ({expected} values), got {stats.numel()}",
    )


def packed_4bit_bytes(n: int, storage_itemsize: int) -> int:
    """Bytes of packed storage for ``n`` 4-bit codes, rounded up to whole ``quant_storage`` elements."""
    return -(-(-(-n // 2)) // storage_itemsize) * storage_itemsize


def check_code(op: str, code: torch.Tensor) -> None:
    torch._check_type(code.dtype == torch.float32, lambda: f"{op}: code must be float32, got {_dtype_name(code.dtype)}")
    torch._check_value(
        code.numel() == DYNAMIC_MAP_SIZE, lambda: f"{op}: code must hold 256 values, got {code.numel()}"
    )


@torch.library.register_fake("bnbx::quantize_4bit")
def _(A: torch.Tensor, blocksize: int, quant_type: str, quant_storage: torch.dtype):
    op = "quantize_4bit"
    check_float_dtype(op, "A", A.dtype)
    check_blocksize(op, blocksize)
    check_quant_storage(op, quant_storage)
    check_quant_type(op, quant_type)
    n = A.numel()
    itemsize = quant_storage.itemsize
    packed = torch.empty((packed_4bit_bytes(n, itemsize) // itemsize, 1), dtype=quant_storage, device=A.device)
    absmax = torch.empty((-(-n // blocksize),), dtype=torch.float32, device=A.device)
    return packed, absmax


def _check_dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype) -> int:
    op = "dequantize_4bit"
    check_blocksize(op, blocksize)
    check_quant_type(op, quant_type)
    check_float_dtype(op, "dtype", dtype)
    check_quant_storage(op, A.dtype)
    check_same_device(op, A, "A", absmax, "absmax")
    n = checked_numel(op, shape)
    stored = A.numel() * A.element_size()
    needed = -(-n // 2)
    torch._check_value(
        needed <= stored < needed + A.element_size(),
        lambda: f"{op}: A holds {stored} bytes of packed codes but shape {list(shape)} needs {needed}",
    )
    check_block_stats(op, "absmax", absmax, -(-n // blocksize))
    return n


@torch.library.register_fake("bnbx::dequantize_4bit")
def _(A, absmax, blocksize: int, quant_type: str, shape: Sequence[int], dtype: torch.dtype):
    _check_dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype)
    return torch.empty(shape, dtype=dtype, device=A.device)


@torch.library.register_fake("bnbx::dequantize_4bit.out")
def _(A, absmax, blocksize: int, quant_type: str, shape: Sequence[int], dtype: torch.dtype, *, out):
    _check_dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype)
    torch._check_value(
        tuple(out.shape) == tuple(shape) and out.dtype == dtype,
        lambda: f"dequantize_4bit: out must have shape {list(shape)} and dtype {_dtype_name(dtype)}, "
        f"got {list(out.shape)} and {_dtype_name(out.dtype)}",
    )
    torch._check_value(out.is_contiguous(), lambda: "dequantize_4bit: out must be contiguous")
    check_same_device("dequantize_4bit", A, "A", out, "out")


@torch.library.register_fake("bnbx::quantize_blockwise")
def _(A: torch.Tensor, code: torch.Tensor, blocksize: int):
    op = "quantize_blockwise"
    check_float_dtype(op, "A", A.dtype)
    check_blocksize(op, blocksize, BLOCKSIZES_8BIT)
    check_code(op, code)
    check_same_device(op, A, "A", code, "code")
    codes = torch.empty(A.shape, dtype=torch.uint8, device=A.device)
    absmax = torch.empty((-(-A.numel() // blocksize),), dtype=torch.float32, device=A.device)
    return codes, absmax


@torch.library.register_fake("bnbx::dequantize_blockwise")
def _(A: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, dtype: torch.dtype):
    op = "dequantize_blockwise"
    torch._check_type(A.dtype == torch.uint8, lambda: f"{op}: A must be uint8 codes, got {_dtype_name(A.dtype)}")
    check_blocksize(op, blocksize, BLOCKSIZES_8BIT)
    check_code(op, code)
    check_float_dtype(op, "dtype", dtype)
    check_same_device(op, A, "A", absmax, "absmax")
    check_same_device(op, A, "A", code, "code")
    check_block_stats(op, "absmax", absmax, -(-A.numel() // blocksize))
    return torch.empty(A.shape, dtype=dtype, device=A.device)


def _check_group_size(op: str, group_size: int) -> None:
    torch._check_value(group_size >= 1, lambda: f"{op}: group_size must be at least 1, got {group_size}")


@torch.library.register_fake("bnbx::quantize_int8")
def _(A: torch.Tensor, group_size: int, symmetric: bool):
    op = "quantize_int8"
    check_float_dtype(op, "A", A.dtype)
    _check_group_size(op, group_size)
    groups = -(-A.numel() // group_size)
    q = torch.empty(A.shape, dtype=torch.int8, device=A.device)
    scale = torch.empty((groups,), dtype=torch.float32, device=A.device)
    zero_point = torch.empty((groups,), dtype=torch.int32, device=A.device)
    return q, scale, zero_point


@torch.library.register_fake("bnbx::dequantize_int8")
def _(A: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, group_size: int, dtype: torch.dtype):
    op = "dequantize_int8"
    torch._check_type(A.dtype == torch.int8, lambda: f"{op}: A must be int8, got {_dtype_name(A.dtype)}")
    _check_group_size(op, group_size)
    check_float_dtype(op, "dtype", dtype)
    check_same_device(op, A, "A", scale, "scale")
    check_same_device(op, A, "A", zero_point, "zero_point")
    groups = -(-A.numel() // group_size)
    check_block_stats(op, "scale", scale, groups)
    check_block_stats(op, "zero_point", zero_point, groups, torch.int32)
    return torch.empty(A.shape, dtype=dtype, device=A.device)


# --- double quantization -----------------------------------------------------------------------------------


@torch.library.register_fake("bnbx::double_quantize")
def _(absmax: torch.Tensor, code: torch.Tensor, blocksize: int):
    op = "double_quantize"
    torch._check_type(
        absmax.dtype == torch.float32, lambda: f"{op}: absmax must be float32, got {_dtype_name(absmax.dtype)}"
    )
    check_blocksize(op, blocksize, BLOCKSIZES_8BIT)
    check_code(op, code)
    check_same_device(op, absmax, "absmax", code, "code")
    q = torch.empty(absmax.shape, dtype=torch.uint8, device=absmax.device)
    absmax2 = torch.empty((-(-absmax.numel() // blocksize),), dtype=torch.float32, device=absmax.device)
    offset = torch.empty((), dtype=torch.float32, device=absmax.device)
    return q, absmax2, offset
