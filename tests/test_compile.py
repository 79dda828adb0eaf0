"""torch.compile(fullgraph=True) traces code calling bnbx ops without graph breaks."""

from __future__ import annotations

import pytest
import torch

import bnbx  # noqa: F401
from bnbx import functional as F


def test_ops_compile_fullgraph():
    def round_trip(A: torch.Tensor) -> torch.Tensor:
        packed, absmax = torch.ops.bnbx.quantize_4bit(A, 64, "nf4", torch.uint8)
        return torch.ops.bnbx.dequantize_4bit(packed, absmax, 64, "nf4", list(A.shape), A.dtype) * 2

    A = torch.randn(33, 130, dtype=torch.bfloat16)
    compiled = torch.compile(round_trip, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(A), round_trip(A))


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_functional_api_compiles_fullgraph(nested):
    def round_trip(A: torch.Tensor) -> torch.Tensor:
        packed, state = F.quantize_4bit(A, blocksize=64, compress_statistics=nested)
        return F.dequantize_4bit(packed, state)

    A = torch.randn(64, 128)
    compiled = torch.compile(round_trip, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(A), round_trip(A))


def test_dequantize_compiles_with_inductor():
    packed, state = F.quantize_4bit(torch.randn(64, 256))

    def linear(x: torch.Tensor) -> torch.Tensor:
        return x @ F.dequantize_4bit(packed, state).t()

    x = torch.randn(4, 256)
    compiled = torch.compile(linear, fullgraph=True)
    torch.testing.assert_close(compiled(x), linear(x))
