"""Plain-torch references of the LLM.int8() ops: the rules the kernels are held to, bit for bit."""

from __future__ import annotations

import math

import torch

INV127 = 7.874015718698502e-3
INV127_SQ = 6.200124e-05


def rows_of(A: torch.Tensor) -> int:
    return math.prod(A.shape[:-1])


def int8_vectorwise_quant_ref(A: torch.Tensor, threshold: float = 0.0):
    """(q, stats, outlier_cols): bitsandbytes' rule, NaN/Inf rows give q = 0."""
    K = A.shape[-1]
    x = A.reshape(rows_of(A), K).float()
    ax = x.abs()
    if threshold > 0:
        thr = torch.tensor(threshold, dtype=A.dtype).float()  # compared in A's dtype, as bitsandbytes does
        outliers = ax >= thr
        cols = outliers.any(0).nonzero().flatten()
    else:
        outliers = torch.zeros_like(ax, dtype=torch.bool)
        cols = torch.empty(0, dtype=torch.int64)
    nan = ax.isnan()
    stats = ax.masked_fill(outliers | nan, 0).amax(1) if K else torch.zeros(x.shape[0])
    stats = torch.where(nan.any(1), torch.full_like(stats, float("nan")), stats)
    scale = (1.0 / stats) * 127.0  # torch's 127 / stats
    q = torch.round(x * scale[:, None])
    q = torch.where(q.isnan(), torch.zeros_like(q), q)
    q[:, cols] = 0
    return q.to(torch.int8).reshape(A.shape), stats, cols


def int8_vectorwise_dequant_ref(q: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    K = q.shape[-1]
    return (q.reshape(rows_of(q), K).float() * stats.reshape(-1, 1) * INV127).reshape(q.shape)


def int8_linear_matmul_ref(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Exact: int64 sums, checked to fit int32."""
    C = A.reshape(rows_of(A), A.shape[-1]).long() @ B.long().t()
    assert C.abs().max().item() < 2**31 if C.numel() else True
    return C.to(torch.int32).reshape(*A.shape[:-1], B.shape[0])


def int8_mm_dequant_ref(C, row_stats, col_stats, bias=None, dtype=torch.float16, a_out=None, b_out=None):
    N = C.shape[-1]
    t = C.reshape(rows_of(C), N).float() * (row_stats.reshape(-1, 1) * col_stats.reshape(1, -1))
    t = t * INV127_SQ
    if bias is not None:
        t = t + bias.float()
    if a_out is not None:
        for j in range(a_out.shape[1]):
            t = t + a_out[:, j : j + 1] * b_out[j : j + 1, :]
    return t.to(dtype).reshape(C.shape)


def int8_mixed_linear_ref(A, CB, SCB, bias=None, threshold=0.0):
    """The fused layer: int8 part + fp32 outlier part (in column order), one rounding to A.dtype."""
    K = A.shape[-1]
    q, stats, cols = int8_vectorwise_quant_ref(A, threshold)
    C = int8_linear_matmul_ref(q.reshape(rows_of(A), K), CB)
    a_out = A.reshape(rows_of(A), K)[:, cols].float()
    b_out = (CB[:, cols].float() * SCB.reshape(-1, 1) * INV127).t()
    out = int8_mm_dequant_ref(C, stats, SCB, bias, A.dtype, a_out, b_out)
    return out.reshape(*A.shape[:-1], CB.shape[0])
