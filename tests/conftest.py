"""Shared test parameters: devices (CUDA skipped cleanly without a GPU or a CUDA build), dtypes, seeds."""

from __future__ import annotations

import zlib

import pytest
import torch

import bnbx

CUDA_READY = torch.cuda.is_available() and bnbx.cuda_built()
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not CUDA_READY, reason="needs a CUDA GPU and a bnbx built with CUDA kernels"),
    ),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
QUANT_TYPES = ["nf4", "fp4"]


def dtype_id(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, str(dtype))


@pytest.fixture(autouse=True)
def _seed(request):
    # a fresh but reproducible seed per test: different tests see different data
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
