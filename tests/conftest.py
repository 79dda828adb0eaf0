"""Shared test parameters: devices (CUDA skipped cleanly without a GPU or a CUDA build), dtypes, seeds, and the
CPU instruction-set switch."""

from __future__ import annotations

import contextlib
import zlib

import pytest
import torch

import bnbx
from bnbx import _library

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


@contextlib.contextmanager
def cpu_isa(name: str):
    """Run the bnbx CPU kernels of instruction set ``name`` ("scalar", "avx2", "avx512") inside the block."""
    previous = _library.cpu_capability()
    _library.set_cpu_capability(name)
    try:
        yield
    finally:
        _library.set_cpu_capability(previous)


def cpu_supports(name: str) -> bool:
    try:
        with cpu_isa(name):
            return True
    except ValueError:
        return False


def isa_params(*names: str) -> list:
    """pytest parameters for the instruction sets ``names``, each skipped where this CPU lacks it."""
    return [pytest.param(n, marks=pytest.mark.skipif(not cpu_supports(n), reason=f"this CPU lacks {n}")) for n in names]


@contextlib.contextmanager
def gemm_route(name: str):
    """Run bnbx's CPU int8 GEMM through route ``name`` ("auto", "amx", "avx512_vnni", "base") inside the block."""
    from bnbx.functional_int8 import _force_int8_gemm

    _force_int8_gemm(name)
    try:
        yield
    finally:
        _force_int8_gemm("auto")


def dtype_id(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, str(dtype))


@pytest.fixture(autouse=True)
def _seed(request):
    # a fresh but reproducible seed per test: different tests see different data
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
