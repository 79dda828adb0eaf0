"""Argument checks shared by the fake kernels (``_ops.py``, ``_ops_qat.py``) and the Python wrappers.

They repeat the C++ checks of ``csrc/common/checks.h`` with the same words (``tests/test_errors.py`` holds
both to it). A leaf module below ``_ops.py`` and ``_ops_qat.py``, so both can import it without a cycle.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ._formats import BLOCKSIZES, DYNAMIC_MAP_SIZE, QUANT_STORAGES, QUANT_TYPES, SUPPORTED_FLOATS
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


def check_code(op: str, code: torch.Tensor) -> None:
    torch._check_type(code.dtype == torch.float32, lambda: f"{op}: code must be float32, got {_dtype_name(code.dtype)}")
    torch._check_value(code.numel() == DYNAMIC_MAP_SIZE, lambda: f"{op}: code must hold 256 values, got {code.numel()}")
