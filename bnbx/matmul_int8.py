"""Differentiable LLM.int8() matmul: autograd for ``bnbx::int8_mixed_linear`` and the 16-bit-weight path.

- Frozen int8 weight (inference, adapters on top): ``torch.library.register_autograd`` gives the op its
  backward, so ``torch.compile`` and ``opcheck`` see it: ``grad_A = grad @ dequant(CB, SCB)`` (the weight is
  dequantized for the step, computed in the gradient's dtype), ``grad_bias = grad.sum``.
- ``has_fp16_weights=True`` (training the 16-bit weight): the forward quantizes the weight row-wise for the int8
  product; the backward uses the 16-bit weight itself, and ``grad_W = grad^T @ A``.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import functional_int8 as F8

__all__ = ["matmul_8bit"]


def _setup_context(ctx, inputs, output) -> None:
    A, CB, SCB, bias, _threshold = inputs
    ctx.save_for_backward(CB, SCB)
    ctx.a_dtype = A.dtype
    ctx.has_bias = bias is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _grads(ctx, grad: torch.Tensor, need_A: bool, need_bias: bool):
    CB, SCB = ctx.saved_tensors
    grad_A = grad_bias = None
    if need_A:
        weight = torch.ops.bnbx.int8_vectorwise_dequant(CB, SCB).to(grad.dtype)
        grad_A = torch.matmul(grad, weight).to(ctx.a_dtype)
    if ctx.has_bias and need_bias:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
    return grad_A, grad_bias


def _backward(ctx, grad: torch.Tensor):
    grad_A, grad_bias = _grads(ctx, grad, ctx.needs_input_grad[0], ctx.needs_input_grad[3])
    return grad_A, None, None, grad_bias, None


torch.library.register_autograd("bnbx::int8_mixed_linear", _backward, setup_context=_setup_context)


def _setup_context_packed(ctx, inputs, output) -> None:
    A, CB, _packed, SCB, bias, threshold = inputs
    _setup_context(ctx, (A, CB, SCB, bias, threshold), output)


def _backward_packed(ctx, grad: torch.Tensor):
    grad_A, grad_bias = _grads(ctx, grad, ctx.needs_input_grad[0], ctx.needs_input_grad[4])
    return grad_A, None, None, None, grad_bias, None


torch.library.register_autograd("bnbx::int8_mixed_linear_packed", _backward_packed, setup_context=_setup_context_packed)


class _MatMul8bitFp16Weights(torch.autograd.Function):
    """int8 forward from a 16-bit weight quantized on the fly; exact 16-bit backward for A, W and bias."""

    @staticmethod
    def forward(ctx, A: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], threshold: float):
        CB, SCB, _ = torch.ops.bnbx.int8_vectorwise_quant(weight.detach(), 0.0)
        ctx.save_for_backward(A, weight)
        ctx.has_bias = bias is not None
        with torch.no_grad():
            return torch.ops.bnbx.int8_mixed_linear(A, CB, SCB, bias, threshold)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        A, weight = ctx.saved_tensors
        grad_A = grad_W = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_A = torch.matmul(grad.to(weight.dtype), weight).to(A.dtype)
        if ctx.needs_input_grad[1]:
            g2 = grad.reshape(-1, grad.shape[-1])
            grad_W = torch.matmul(g2.t().to(weight.dtype), A.reshape(-1, A.shape[-1]).to(weight.dtype))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_A, grad_W, grad_bias, None


def matmul_8bit(
    A: torch.Tensor,
    weight: torch.Tensor,
    SCB: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    threshold: float = 0.0,
    packed_CB: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``A @ W.T + bias`` through LLM.int8() in ``A.dtype``.

    ``weight`` is either the int8 ``CB [N, K]`` with its row absmax ``SCB`` (frozen), or a 16-bit float weight
    (``SCB=None``), quantized row-wise for the forward and trained through the 16-bit backward. ``packed_CB``
    (CPU, int8 weight only): ``int8_pack_weight(CB)``, which saves packing the weight on every large-M call.
    """
    threshold = F8._check_threshold("matmul_8bit", threshold)
    if bias is not None and bias.dtype != A.dtype:
        bias = bias.to(A.dtype)
    if weight.dtype == torch.int8:
        if SCB is None:
            raise ValueError("matmul_8bit: an int8 weight needs its row statistics SCB")
        if packed_CB is not None:
            return torch.ops.bnbx.int8_mixed_linear_packed(A, weight, packed_CB, SCB, bias, threshold)
        return torch.ops.bnbx.int8_mixed_linear(A, weight, SCB, bias, threshold)
    if packed_CB is not None:
        raise ValueError("matmul_8bit: packed_CB is only for an int8 weight")
    if SCB is not None:
        raise ValueError(f"matmul_8bit: SCB is only for an int8 weight, got a {weight.dtype} weight")
    return _MatMul8bitFp16Weights.apply(A, weight, bias, threshold)
