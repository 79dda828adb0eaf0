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


def assert_close_to_reference(ours: torch.Tensor, A, packed, state, bias=None) -> None:
    """``ours`` (a gemm_4bit result, on any device) is no further from the float64 product than
    dequantize-then-matmul in A's dtype is (up to summation order), plus a few units in the last place."""
    A, packed, bias = A.cpu(), packed.cpu(), None if bias is None else bias.cpu()
    ours = ours.cpu()
    absmax = state.get_absmax()
    ref = gemm_4bit_ref(A, packed, absmax, state.blocksize, state.quant_type, tuple(state.shape), bias)
    base = dequantize_then_matmul(A, packed, absmax, state.blocksize, state.quant_type, tuple(state.shape), bias)
    assert ours.shape == base.shape and ours.dtype == A.dtype
    if ref.numel() == 0:
        return
    scale = ref.abs().max().item() + 1.0
    ours_err = (ours.double() - ref).abs().max().item()
    base_err = (base.double() - ref).abs().max().item()
    ulp = {torch.float32: 2**-22, torch.float16: 2**-9, torch.bfloat16: 2**-7}[A.dtype]
    assert ours_err <= 2 * base_err + 4 * ulp * scale, (ours_err, base_err, scale)
