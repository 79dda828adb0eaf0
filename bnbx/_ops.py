"""Fake (meta) kernels for every ``torch.ops.bnbx`` op, so ``torch.compile`` and ``opcheck`` can trace them.

The schemas live in ``csrc/ops.cpp``. Each fake repeats the C++ checks of ``csrc/common/checks.h`` with the
same words (``tests/test_errors.py`` holds both to it), computes output shapes and dtypes with
``torch.empty`` on the input's device, and never reads data.

The quantize/dequantize ops are not differentiable (quantization has no useful gradient here; fake-quant ops
with a straight-through estimator are separate). ``gemm_4bit`` registers autograd for A and bias (the 4-bit
weight is frozen).
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
    torch._check_value(code.numel() == DYNAMIC_MAP_SIZE, lambda: f"{op}: code must hold 256 values, got {code.numel()}")


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


def _check_int8_weight(op: str, name: str, B: torch.Tensor, K: int, A: torch.Tensor) -> None:
    torch._check_type(B.dtype == torch.int8, lambda: f"{op}: {name} must be int8, got {_dtype_name(B.dtype)}")
    torch._check_value(B.dim() == 2, lambda: f"{op}: {name} must be 2-D [N, K], got {B.dim()} dimensions")
    torch._check_value(
        B.shape[1] == K, lambda: f"{op}: {name} must be [N, K] with K = A.shape[-1] = {K}, got {list(B.shape)}"
    )
    torch._check_value(
        K <= INT8_MAX_K, lambda: f"{op}: K must be at most {INT8_MAX_K} so int32 sums cannot overflow, got {K}"
    )
    check_same_device(op, A, "A", B, name)


def _check_bias(op: str, bias, N: int, A: torch.Tensor) -> None:
    if bias is None:
        return
    check_float_dtype(op, "bias", bias.dtype)
    torch._check_value(bias.numel() == N, lambda: f"{op}: bias must hold N = {N} values, got {bias.numel()}")
    check_same_device(op, A, "A", bias, "bias")


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
    op = "int8_mixed_linear"
    check_float_dtype(op, "A", A.dtype)
    torch._check_value(A.dim() >= 1, lambda: f"{op}: A must have at least one dimension, got a scalar")
    _check_int8_weight(op, "CB", CB, A.shape[-1], A)
    _check_stats(op, "SCB", SCB, CB.shape[0], A)
    _check_bias(op, bias, CB.shape[0], A)
    check_threshold(op, threshold)
    return torch.empty((*A.shape[:-1], CB.shape[0]), dtype=A.dtype, device=A.device)


def int8_packed_weight_bytes(N: int, K: int) -> int:
    """Bytes of ``int8_pack_weight``'s AMX tile layout of an ``[N, K]`` weight: 16-row blocks x 64-byte k chunks."""
    return 16 * -(-N // 16) * 64 * -(-K // 64)


@torch.library.register_fake("bnbx::int8_pack_weight")
def _(CB: torch.Tensor):
    op = "int8_pack_weight"
    torch._check_type(CB.dtype == torch.int8, lambda: f"{op}: CB must be int8, got {_dtype_name(CB.dtype)}")
    torch._check_value(CB.dim() == 2, lambda: f"{op}: CB must be 2-D [N, K], got {CB.dim()} dimensions")
    torch._check_value(
        CB.shape[1] <= INT8_MAX_K,
        lambda: f"{op}: K must be at most {INT8_MAX_K} so int32 sums cannot overflow, got {CB.shape[1]}",
    )
    return torch.empty((int8_packed_weight_bytes(*CB.shape),), dtype=torch.uint8, device=CB.device)


@torch.library.register_fake("bnbx::int8_mixed_linear_packed")
def _(A: torch.Tensor, CB: torch.Tensor, packed_CB: torch.Tensor, SCB: torch.Tensor, bias=None, threshold=0.0):
    op = "int8_mixed_linear_packed"
    check_float_dtype(op, "A", A.dtype)
    torch._check_value(A.dim() >= 1, lambda: f"{op}: A must have at least one dimension, got a scalar")
    _check_int8_weight(op, "CB", CB, A.shape[-1], A)
    _check_stats(op, "SCB", SCB, CB.shape[0], A)
    _check_bias(op, bias, CB.shape[0], A)
    check_threshold(op, threshold)
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
# Fake kernel with the checks of csrc/common/checks_fake_quant.h, and the straight-through gradient. Scales and
# zero points are statistics (no gradient); the learnable-scale path (LSQ) is the fake_quant_lsq block below.
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


@torch.library.register_fake("bnbx::fake_quantize")
def _(x: torch.Tensor, group_size: int, bits: int, symmetric: bool, full_range: bool, mask: str, clip: float):
    check_fake_quantize_args(x, group_size, bits, mask, clip)
    groups = -(-x.numel() // group_size)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    scale = torch.empty((groups,), dtype=torch.float32, device=x.device)
    zero_point = torch.empty((groups,), dtype=torch.int32, device=x.device)
    return out, scale, zero_point


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


# --- fake_quant_lsq (QAT: LSQ / LSQ+) -------------------------------------------------------------------------
# The checks of csrc/common/checks_fake_quant.h (check_fake_quantize_lsq_args) with the same words, the fake
# kernels, and the autograd formula: the backward is one more fused op.
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


def _check_grad_scale(op: str, grad_scale: float) -> None:
    if not math.isfinite(grad_scale):
        raise ValueError(f"{op}: grad_scale must be finite, got {grad_scale:g}")


@torch.library.register_fake("bnbx::fake_quantize_lsq")
def _(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, qmin: float, qmax: float, grad_scale: float = 1.0):
    check_fake_quantize_lsq_args("fake_quantize_lsq", x, scale, offset, qmin, qmax)
    _check_grad_scale("fake_quantize_lsq", grad_scale)
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
    _check_grad_scale(op, grad_scale)
    return (
        torch.empty(x.shape, dtype=x.dtype, device=x.device),
        torch.empty(scale.shape, dtype=scale.dtype, device=scale.device),
        torch.empty(offset.shape, dtype=offset.dtype, device=offset.device),
    )


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
