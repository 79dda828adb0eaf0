"""Matrix products with quantized weights.

``matmul_4bit`` multiplies by a packed NF4/FP4 weight without dequantizing it whole: a fused 4-bit GEMV for
a few rows of input, tiles of the weight dequantized into a 16-bit GEMM for many (``torch.ops.bnbx.gemm_4bit``).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _formats
from .quant_state import QuantState

__all__ = ["matmul_4bit"]


def matmul_4bit(
    A: torch.Tensor,
    B: torch.Tensor,
    quant_state: QuantState,
    out: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``A @ W^T + bias`` where ``W [N, K]`` is the 4-bit weight packed in ``B`` (bitsandbytes' signature).

    Args:
        A: fp32, fp16 or bf16 input of any leading shape, last dimension ``K`` (in_features).
        B: the packed weight from :func:`bnbx.quantize_4bit` of ``W [N, K]`` (any view of its bytes, e.g. the
            ``[bytes, 1]`` column or its transpose, as ``Linear4bit`` passes it).
        quant_state: the weight's :class:`~bnbx.QuantState`; ``quant_state.shape`` must be ``[N, K]``.
        out: optional tensor of the result's shape and dtype, written in place.
        bias: optional ``[N]``, cast to ``A``'s dtype.

    Returns:
        ``[..., N]`` in ``A``'s dtype. Differentiable with respect to ``A`` and ``bias``: the input gradient is
        ``grad @ W`` with ``W`` dequantized in ``A``'s dtype. The 4-bit weight is frozen (no gradient).
        Double-quantized statistics are decoded inside the kernel.
    """
    op = "matmul_4bit"
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"{op}: A must be a torch.Tensor, got {type(A).__name__}")
    if not isinstance(B, torch.Tensor):
        raise TypeError(f"{op}: B must be a torch.Tensor, got {type(B).__name__}")
    if not isinstance(quant_state, QuantState):
        raise TypeError(f"{op}: quant_state must be a QuantState, got {type(quant_state).__name__}")
    if A.dtype not in _formats.SUPPORTED_FLOATS:
        raise TypeError(f"{op}: A must be float32, float16 or bfloat16, got {_formats.dtype_name(A.dtype)}")
    if quant_state.quant_type not in _formats.QUANT_TYPES or len(quant_state.shape) != 2:
        raise ValueError(
            f"{op}: quant_state must describe a 4-bit [out_features, in_features] weight, got quant_type "
            f"{quant_state.quant_type!r} and shape {list(quant_state.shape)}"
        )
    N, K = quant_state.shape
    if A.dim() == 0 or A.shape[-1] != K:
        raise ValueError(
            f"{op}: A's last dimension must equal in_features ({K}), got A of shape {list(A.shape)}"
        )
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"{op}: bias must be a torch.Tensor or None, got {type(bias).__name__}")
        bias = bias.to(A.dtype)
    state2 = quant_state.state2
    result = torch.ops.bnbx.gemm_4bit(
        A,
        B.reshape(-1),
        quant_state.absmax,
        quant_state.blocksize,
        quant_state.quant_type,
        [N, K],
        bias,
        None if state2 is None else state2.absmax,
        None if state2 is None else state2.code,
        None if state2 is None else quant_state.offset,
        256 if state2 is None else state2.blocksize,
    )
    if out is None:
        return result
    if out.shape != result.shape or out.dtype != result.dtype:
        raise ValueError(
            f"{op}: out must have shape {list(result.shape)} and dtype {_formats.dtype_name(result.dtype)}, "
            f"got {list(out.shape)} and {_formats.dtype_name(out.dtype)}"
        )
    return out.copy_(result)
