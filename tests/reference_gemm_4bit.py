"""Plain-torch reference of gemm_4bit / matmul_4bit: dequantize the whole weight, multiply in float64."""

from __future__ import annotations

from typing import Optional

import torch

from reference import dequantize_4bit_ref


def gemm_4bit_ref(
    A: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    quant_type: str,
    shape: tuple[int, int],
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``A @ W^T + bias`` in float64, ``W = code[q] * absmax`` (fp32, exact as the format defines it).
    ``absmax`` is the decoded fp32 absmax (``QuantState.get_absmax()``)."""
    weight = dequantize_4bit_ref(packed, absmax, blocksize, quant_type, shape, torch.float32).double()
    out = A.double() @ weight.t()
    if bias is not None:
        out = out + bias.double()
    return out


def dequantize_then_matmul(
    A: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    quant_type: str,
    shape: tuple[int, int],
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """What bitsandbytes does off its fast path: the weight dequantized in A's dtype, then F.linear."""
    weight = dequantize_4bit_ref(packed, absmax, blocksize, quant_type, shape, A.dtype)
    return torch.nn.functional.linear(A, weight, None if bias is None else bias.to(A.dtype))
