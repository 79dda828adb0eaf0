"""Inputs that stress the block rules (NaN, +-Inf, +-0, subnormal, FLT_MAX blocks) and a NaN-aware bit
comparison, shared by the CUDA emulation tests, the CUDA-vs-CPU byte tests and benchmarks/gpu_check.py.

The NaN contract is "NaN": a quantized block that holds NaN or Inf stores a NaN scale (its bits are explicit,
0x7fc00000, so stored bytes never depend on the machine), and every element it dequantizes to is a NaN, whose
payload and sign may differ between hosts (x86 and aarch64 make different NaNs for 0 * Inf) and GPUs. So
outputs are compared bit for bit except that any NaN equals any NaN.
"""

from __future__ import annotations

import torch

_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Equal bit for bit (floats: any NaN matches any NaN, +0 and -0 differ); integer tensors exactly."""
    actual, expected = actual.detach().cpu().reshape(-1), expected.detach().cpu().reshape(-1)
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, (what, actual.dtype, expected.dtype,
                                                                               actual.shape, expected.shape)
    if actual.dtype not in _INT_VIEW:
        mismatch = (actual != expected).nonzero()
        assert mismatch.numel() == 0, f"{what}: {mismatch.numel()} differ, first at {mismatch[0].item()}"
        return
    nan_a, nan_e = torch.isnan(actual), torch.isnan(expected)
    bad = (nan_a != nan_e) | (~nan_a & (actual.view(_INT_VIEW[actual.dtype]) != expected.view(_INT_VIEW[actual.dtype])))
    if bad.any():
        i = int(bad.nonzero()[0])
        raise AssertionError(f"{what}: {int(bad.sum())} of {actual.numel()} differ, first at {i}: "
                             f"{actual[i].item()!r} vs {expected[i].item()!r}")


def special_input(n: int, dtype: torch.dtype, blocksize: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """n values of dtype in blocks of blocksize: random normal blocks at random scales (block 0 always), and,
    cycling over the other blocks, one block each of: a NaN, +Inf, -Inf, zeros, -0.0, mixed +-0, subnormals,
    +-the largest finite value, +-the smallest normal, and a single non-zero value."""
    finfo = torch.finfo(dtype)
    blocks = -(-n // blocksize)
    scales = torch.exp2(torch.randint(-20, 20, (blocks,), generator=generator).float())
    x = (torch.randn(n, generator=generator) * scales.repeat_interleave(blocksize)[:n]).to(dtype)
    block = torch.arange(n) // blocksize
    kind = torch.where(block == 0, 0, block % 11)  # 0: random
    # one random position per block (inside the block, also the last partial one)
    length = torch.clamp(n - torch.arange(blocks) * blocksize, max=blocksize)
    pos = torch.arange(blocks) * blocksize + (torch.rand(blocks, generator=generator) * length).long()
    at_pos = torch.zeros(n, dtype=torch.bool)
    at_pos[pos] = True
    coin = torch.rand(n, generator=generator) < 0.5
    sign = torch.where(coin, 1.0, -1.0)
    tiny = finfo.smallest_normal
    subnormal = torch.randint(-200, 200, (n,), generator=generator).float() * (tiny / 256)  # below tiny
    single = torch.randn(n, generator=generator)
    for k, values, where in [
        (1, torch.full((n,), float("nan")), at_pos),
        (2, torch.full((n,), float("inf")), at_pos),
        (3, torch.full((n,), float("-inf")), at_pos),
        (4, torch.zeros(n), None),
        (5, torch.full((n,), -0.0), None),
        (6, torch.where(coin, 0.0, -0.0), None),
        (7, subnormal, None),
        (8, (torch.rand(n, generator=generator) * 2 - 1) * finfo.max, None),
        (8, torch.full((n,), -finfo.max), at_pos),
        (9, sign * tiny, None),
        (10, torch.zeros(n), None),
        (10, single, at_pos),
    ]:
        mask = kind == k if where is None else (kind == k) & where
        x[mask] = values[mask].to(dtype)
    return x
