"""Fake (meta) kernels for every ``torch.ops.bnbx`` op, so ``torch.compile`` and ``opcheck`` can trace them.

The schemas live in ``csrc/ops.cpp``, whose ``set_python_module("bnbx._ops")`` makes torch require every
``register_fake`` of those ops to be called from this module. Each fake repeats the C++ checks of
``csrc/common/checks*.h`` with the same words (``_checks.py``, ``_ops_qat.py`` and the blocks below;
``tests/test_errors.py`` holds both to it), computes output shapes and dtypes with ``torch.empty`` on the
input's device, and never reads data.

The quantize/dequantize ops are not differentiable (quantization has no useful gradient here; the fake-quant
ops of QAT have their autograd in ``_ops_qat.py``, ``lora_forward`` in ``_ops_lora.py``). ``gemm_4bit`` registers
autograd for A and bias (the 4-bit weight is frozen).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ._checks import (
    check_block_stats,
    check_blocksize,
    check_code,
    check_float_dtype,
    check_quant_storage,
    check_quant_type,
    check_same_device,
    checked_numel,
)
from ._formats import BLOCKSIZES_8BIT
from ._formats import dtype_name as _dtype_name
from ._ops_lora import check_lora_args
from ._ops_qat import check_grad_scale, check_fake_quantize_args, check_fake_quantize_lsq_args


def packed_4bit_bytes(n: int, storage_itemsize: int) -> int:
    """Bytes of packed storage for ``n`` 4-bit codes, rounded up to whole ``quant_storage`` elements."""
    return -(-(-(-n // 2)) // storage_itemsize) * storage_itemsize


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
        lambda: (
            f"dequantize_4bit: out must have shape {list(shape)} and dtype {_dtype_name(dtype)}, "
            f"got {list(out.shape)} and {_dtype_name(out.dtype)}"
        ),
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


# --- gemm_4bit: products with a packed 4-bit weight ------------------------------------------------------------


def _check_gemm_4bit(
    A, B, absmax, blocksize, quant_type, shape, bias, nested_absmax, nested_code, nested_offset, nested_blocksize
) -> tuple[int, int]:
    op = "gemm_4bit"
    check_float_dtype(op, "A", A.dtype)
    check_blocksize(op, blocksize)
    check_quant_type(op, quant_type)
    torch._check_value(len(shape) == 2, lambda: f"{op}: shape must be [out_features, in_features], got {list(shape)}")
    n = checked_numel(op, shape)
    N, K = shape
    torch._check_value(
        A.dim() >= 1 and A.shape[-1] == K,
        lambda: f"{op}: A's last dimension must equal in_features ({K}), got A of shape {list(A.shape)}",
    )
    check_quant_storage(op, B.dtype)
    check_same_device(op, A, "A", B, "B")
    check_same_device(op, A, "A", absmax, "absmax")
    stored = B.numel() * B.element_size()
    needed = -(-n // 2)
    torch._check_value(
        needed <= stored < needed + B.element_size(),
        lambda: f"{op}: B holds {stored} bytes of packed codes but shape {list(shape)} needs {needed}",
    )
    blocks = -(-n // blocksize)
    nested = nested_absmax is not None
    torch._check_value(
        nested == (nested_code is not None) == (nested_offset is not None),
        lambda: f"{op}: nested_absmax, nested_code and nested_offset must be given together",
    )
    if nested:
        check_blocksize(op, nested_blocksize)
        check_block_stats(op, "absmax", absmax, blocks, torch.uint8)
        check_block_stats(op, "nested_absmax", nested_absmax, -(-blocks // nested_blocksize))
        check_code(op, nested_code)
        torch._check_type(
            nested_offset.dtype == torch.float32,
            lambda: f"{op}: nested_offset must be float32, got {_dtype_name(nested_offset.dtype)}",
        )
        torch._check_value(
            nested_offset.numel() == 1, lambda: f"{op}: nested_offset must hold one value, got {nested_offset.numel()}"
        )
        check_same_device(op, A, "A", nested_absmax, "nested_absmax")
        check_same_device(op, A, "A", nested_code, "nested_code")
        check_same_device(op, A, "A", nested_offset, "nested_offset")
    else:
        check_block_stats(op, "absmax", absmax, blocks)
    if bias is not None:
        torch._check_type(
            bias.dtype == A.dtype,
            lambda: f"{op}: bias must have A's dtype {_dtype_name(A.dtype)}, got {_dtype_name(bias.dtype)}",
        )
        torch._check_value(
            bias.dim() == 1 and bias.shape[0] == N,
            lambda: f"{op}: bias must have shape [{N}], got {list(bias.shape)}",
        )
        check_same_device(op, A, "A", bias, "bias")
    return N, K


@torch.library.register_fake("bnbx::gemm_4bit")
def _(
    A,
    B,
    absmax,
    blocksize: int,
    quant_type: str,
    shape: Sequence[int],
    bias=None,
    nested_absmax=None,
    nested_code=None,
    nested_offset=None,
    nested_blocksize: int = 256,
):
    N, _ = _check_gemm_4bit(
        A, B, absmax, blocksize, quant_type, shape, bias, nested_absmax, nested_code, nested_offset, nested_blocksize
    )
    return A.new_empty((*A.shape[:-1], N))


def _gemm_4bit_setup_context(ctx, inputs, output) -> None:
    A, B, absmax, blocksize, quant_type, shape, bias, nested_absmax, nested_code, nested_offset, nested_blocksize = (
        inputs
    )
    ctx.save_for_backward(B, absmax, nested_absmax, nested_code, nested_offset)
    ctx.args = (blocksize, quant_type, tuple(shape), nested_blocksize, A.dtype, bias is not None)


def _gemm_4bit_backward(ctx, grad):
    # dL/dA = grad @ W with W dequantized in A's dtype (the forward's weight); dL/dbias = grad summed over rows.
    # The 4-bit weight and its statistics are frozen: no gradient.
    B, absmax, nested_absmax, nested_code, nested_offset = ctx.saved_tensors
    blocksize, quant_type, shape, nested_blocksize, dtype, has_bias = ctx.args
    grad_A = grad_bias = None
    if ctx.needs_input_grad[0]:
        if nested_absmax is not None:
            absmax = torch.ops.bnbx.dequantize_blockwise(
                absmax, nested_absmax, nested_code, nested_blocksize, torch.float32
            ) + nested_offset.reshape(())
        weight = torch.ops.bnbx.dequantize_4bit(B, absmax, blocksize, quant_type, list(shape), dtype)
        grad_A = torch.matmul(grad.to(dtype), weight)
    if has_bias and ctx.needs_input_grad[6]:
        grad_bias = grad.reshape(-1, shape[0]).sum(0).to(dtype)
    return grad_A, None, None, None, None, None, grad_bias, None, None, None, None


torch.library.register_autograd("bnbx::gemm_4bit", _gemm_4bit_backward, setup_context=_gemm_4bit_setup_context)

# ---- LLM.int8() (csrc/common/checks_int8_matmul.h holds the same checks and words) ----------------------------

INT8_MAX_K = 2**17 - 1  # |sum of K int8 products| <= 128 * 128 * K stays inside int32


def _int8_rows(A: torch.Tensor) -> int:
    return math.prod(A.shape[:-1])


def check_threshold(op: str, threshold: float) -> None:
    torch._check_value(
        not math.isnan(threshold) and threshold >= 0.0,
        lambda: f"{op}: threshold must be >= 0 (0 disables outlier columns), got {threshold}",
    )


def _check_int8_rows(op: str, name: str, A: torch.Tensor, dtype: torch.dtype) -> None:
    torch._check_type(
        A.dtype == dtype, lambda: f"{op}: {name} must be {_dtype_name(dtype)}, got {_dtype_name(A.dtype)}"
    )
    torch._check_value(A.dim() >= 1, lambda: f"{op}: {name} must have at least one dimension, got a scalar")


def _check_stats(op: str, name: str, stats: torch.Tensor, expected: int, A: torch.Tensor) -> None:
    torch._check_type(
        stats.dtype == torch.float32, lambda: f"{op}: {name} must be float32, got {_dtype_name(stats.dtype)}"
    )
    torch._check_value(
        stats.numel() == expected, lambda: f"{op}: {name} must hold {expected} values, got {stats.numel()}"
    )
    check_same_device(op, A, "A", stats, name)


def _check_int8_matrix(op: str, name: str, B: torch.Tensor) -> None:
    torch._check_type(B.dtype == torch.int8, lambda: f"{op}: {name} must be int8, got {_dtype_name(B.dtype)}")
    torch._check_value(B.dim() == 2, lambda: f"{op}: {name} must be 2-D [N, K], got {B.dim()} dimensions")


def _check_int8_k(op: str, K: int) -> None:
    torch._check_value(
        K <= INT8_MAX_K, lambda: f"{op}: K must be at most {INT8_MAX_K} so int32 sums cannot overflow, got {K}"
    )


def _check_int8_weight(op: str, name: str, B: torch.Tensor, K: int, A: torch.Tensor) -> None:
    _check_int8_matrix(op, name, B)
    torch._check_value(
        B.shape[1] == K, lambda: f"{op}: {name} must be [N, K] with K = A.shape[-1] = {K}, got {list(B.shape)}"
    )
    _check_int8_k(op, K)
    check_same_device(op, A, "A", B, name)


def _check_bias(op: str, bias, N: int, A: torch.Tensor) -> None:
    if bias is None:
        return
    check_float_dtype(op, "bias", bias.dtype)
    torch._check_value(bias.numel() == N, lambda: f"{op}: bias must hold N = {N} values, got {bias.numel()}")
    check_same_device(op, A, "A", bias, "bias")


def _check_int8_mixed_linear_args(A, CB, SCB, bias, threshold: float, op: str = "int8_mixed_linear") -> None:
    check_float_dtype(op, "A", A.dtype)
    torch._check_value(A.dim() >= 1, lambda: f"{op}: A must have at least one dimension, got a scalar")
    _check_int8_weight(op, "CB", CB, A.shape[-1], A)
    _check_stats(op, "SCB", SCB, CB.shape[0], A)
    _check_bias(op, bias, CB.shape[0], A)
    check_threshold(op, threshold)


@torch.library.register_fake("bnbx::int8_vectorwise_quant")
def _(A: torch.Tensor, threshold: float = 0.0):
    op = "int8_vectorwise_quant"
    check_float_dtype(op, "A", A.dtype)
    torch._check_value(A.dim() >= 1, lambda: f"{op}: A must have at least one dimension, got a scalar")
    check_threshold(op, threshold)
    q = torch.empty(A.shape, dtype=torch.int8, device=A.device)
    stats = torch.empty((_int8_rows(A),), dtype=torch.float32, device=A.device)
    # how many columns hold outliers depends on the data: a dynamic size keeps fullgraph tracing possible
    n_out = torch.library.get_ctx().new_dynamic_size() if threshold > 0.0 and A.shape[-1] > 0 else 0
    cols = torch.empty((n_out,), dtype=torch.int64, device=A.device)
    return q, stats, cols


@torch.library.register_fake("bnbx::int8_vectorwise_dequant")
def _(A: torch.Tensor, stats: torch.Tensor):
    op = "int8_vectorwise_dequant"
    _check_int8_rows(op, "A", A, torch.int8)
    _check_stats(op, "stats", stats, _int8_rows(A), A)
    return torch.empty(A.shape, dtype=torch.float32, device=A.device)


@torch.library.register_fake("bnbx::int8_linear_matmul")
def _(A: torch.Tensor, B: torch.Tensor):
    op = "int8_linear_matmul"
    _check_int8_rows(op, "A", A, torch.int8)
    _check_int8_weight(op, "B", B, A.shape[-1], A)
    return torch.empty((*A.shape[:-1], B.shape[0]), dtype=torch.int32, device=A.device)


@torch.library.register_fake("bnbx::int8_mm_dequant")
def _(A: torch.Tensor, row_stats: torch.Tensor, col_stats: torch.Tensor, dtype=None, bias=None):
    op = "int8_mm_dequant"
    out_dtype = torch.float16 if dtype is None else dtype
    _check_int8_rows(op, "A", A, torch.int32)
    _check_stats(op, "row_stats", row_stats, _int8_rows(A), A)
    _check_stats(op, "col_stats", col_stats, A.shape[-1], A)
    check_float_dtype(op, "dtype", out_dtype)
    _check_bias(op, bias, A.shape[-1], A)
    return torch.empty(A.shape, dtype=out_dtype, device=A.device)


@torch.library.register_fake("bnbx::int8_mixed_linear")
def _(A: torch.Tensor, CB: torch.Tensor, SCB: torch.Tensor, bias=None, threshold: float = 0.0):
    _check_int8_mixed_linear_args(A, CB, SCB, bias, threshold)
    return torch.empty((*A.shape[:-1], CB.shape[0]), dtype=A.dtype, device=A.device)


def int8_packed_weight_bytes(N: int, K: int) -> int:
    """Bytes of ``int8_pack_weight``'s AMX tile layout of an ``[N, K]`` weight: 16-row blocks x 64-byte k chunks."""
    return 16 * -(-N // 16) * 64 * -(-K // 64)


@torch.library.register_fake("bnbx::int8_pack_weight")
def _(CB: torch.Tensor):
    _check_int8_matrix("int8_pack_weight", "CB", CB)
    _check_int8_k("int8_pack_weight", CB.shape[1])
    return torch.empty((int8_packed_weight_bytes(*CB.shape),), dtype=torch.uint8, device=CB.device)


@torch.library.register_fake("bnbx::int8_mixed_linear_packed")
def _(A: torch.Tensor, CB: torch.Tensor, packed_CB: torch.Tensor, SCB: torch.Tensor, bias=None, threshold=0.0):
    op = "int8_mixed_linear_packed"
    _check_int8_mixed_linear_args(A, CB, SCB, bias, threshold, op)
    torch._check_type(
        packed_CB.dtype == torch.uint8,
        lambda: f"{op}: packed_CB must be uint8 (from int8_pack_weight), got {_dtype_name(packed_CB.dtype)}",
    )
    expected = int8_packed_weight_bytes(*CB.shape)
    torch._check_value(
        packed_CB.dim() == 1 and packed_CB.numel() == expected,
        lambda: f"{op}: packed_CB must hold int8_pack_weight(CB)'s {expected} bytes, got shape {list(packed_CB.shape)}",
    )
    check_same_device(op, A, "A", packed_CB, "packed_CB")
    return torch.empty((*A.shape[:-1], CB.shape[0]), dtype=A.dtype, device=A.device)


# --- fake_quant (QAT) -------------------------------------------------------------------------------------
# The fake kernels of fake_quantize, fake_quantize_lsq and its backward; their checks (csrc/common/
# checks_fake_quant.h) and autograd are in _ops_qat.py.


@torch.library.register_fake("bnbx::fake_quantize")
def _(x: torch.Tensor, group_size: int, bits: int, symmetric: bool, full_range: bool, mask: str, clip: float):
    check_fake_quantize_args(x, group_size, bits, mask, clip)
    groups = -(-x.numel() // group_size)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    scale = torch.empty((groups,), dtype=torch.float32, device=x.device)
    zero_point = torch.empty((groups,), dtype=torch.int32, device=x.device)
    return out, scale, zero_point


@torch.library.register_fake("bnbx::fake_quantize_lsq")
def _(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, qmin: float, qmax: float, grad_scale: float = 1.0):
    check_fake_quantize_lsq_args("fake_quantize_lsq", x, scale, offset, qmin, qmax)
    check_grad_scale("fake_quantize_lsq", grad_scale)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.register_fake("bnbx::fake_quantize_lsq_backward")
def _(grad, x, scale, offset, qmin: float, qmax: float, grad_scale: float):
    op = "fake_quantize_lsq_backward"
    check_fake_quantize_lsq_args(op, x, scale, offset, qmin, qmax)
    torch._check_value(
        grad.shape == x.shape and grad.dtype == x.dtype,
        lambda: (
            f"{op}: grad must have x's shape {list(x.shape)} and dtype {_dtype_name(x.dtype)}, got "
            f"{list(grad.shape)} {_dtype_name(grad.dtype)}"
        ),
    )
    check_same_device(op, x, "x", grad, "grad")
    check_grad_scale(op, grad_scale)
    return (
        torch.empty(x.shape, dtype=x.dtype, device=x.device),
        torch.empty(scale.shape, dtype=scale.dtype, device=scale.device),
        torch.empty(offset.shape, dtype=offset.dtype, device=offset.device),
    )


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


# --- lora (checks in _ops_lora.py, as csrc/common/checks_lora.h words them) --------------------------------------


@torch.library.register_fake("bnbx::lora_forward")
def _(x: torch.Tensor, base: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float):
    check_lora_args("lora_forward", x, base, "base", lora_A, lora_B, scaling)
    return torch.empty(base.shape, dtype=base.dtype, device=base.device)


@torch.library.register_fake("bnbx::lora_backward")
def _(grad_out, x, lora_A, lora_B, scaling: float, input_grad: bool):
    check_lora_args("lora_backward", x, grad_out, "grad_out", lora_A, lora_B, scaling)
    grad_x = torch.empty(x.shape if input_grad else (0,), dtype=x.dtype, device=x.device)
    return (
        grad_x,
        torch.empty(lora_A.shape, dtype=lora_A.dtype, device=lora_A.device),
        torch.empty(lora_B.shape, dtype=lora_B.dtype, device=lora_B.device),
    )
