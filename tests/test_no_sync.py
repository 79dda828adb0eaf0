"""No host synchronisation in any op path, and CUDA-graph capture.

On the CPU: the Python wrappers run only their kernels and a few device-side tensor ops per call; they build
no code table (no tensor made from a Python list, no host copy) and read no value back to the host. On a
GPU (skipped without one): every op runs under torch.cuda.set_sync_debug_mode("error") and inside a
torch.cuda.graph capture, whose replay gives the eager results.
"""

from __future__ import annotations

import pytest
import torch
from conftest import CUDA_READY
from special_values import assert_same_bits
from torch.utils._python_dispatch import TorchDispatchMode

import bnbx
from bnbx import functional as F

# aten ops that build a table from host data, copy between devices, or read a value back to the host
FORBIDDEN = {
    "lift_fresh",
    "lift_fresh_copy",
    "_to_copy",
    "copy_",
    "_local_scalar_dense",
    "linspace",
    "_pin_memory",
    "item",
    "nonzero",
    "to",
}


class OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(f"{func.namespace}.{func._schema.name.split('::')[-1]}")
        return func(*args, **(kwargs or {}))


def _calls(device: str):
    """(name, fn) for every op path of the Python API and the raw ops, each quantizing fresh data."""
    A = torch.randn(64, 96, device=device, dtype=torch.bfloat16)
    packed, state = F.quantize_4bit(A, blocksize=64, quant_type="nf4")
    packed2, state2 = F.quantize_4bit(A, blocksize=64, quant_type="fp4", compress_statistics=True)
    codes, bstate = F.quantize_blockwise(A)
    q, istate = F.quantize_int8(A, "channel", axis=1)
    out = torch.empty_like(A)
    code = F._table("dynamic", device)
    # gemm_4bit's CUDA paths: the GEMV (1 row), the tensor-core tiles (16 and 40 rows), dequantize + cuBLAS (100)
    x = {M: torch.randn(M, 96, device=device, dtype=torch.bfloat16) for M in (1, 16, 40, 100)}
    matmuls = [
        (f"matmul_4bit {M} rows", lambda M=M: bnbx.matmul_4bit(x[M], packed2.t(), state2, bias=A[0, :64]))
        for M in x
    ]
    return matmuls + [
        ("quantize_4bit", lambda: F.quantize_4bit(A, blocksize=64, quant_type="nf4")),
        (
            "quantize_4bit fp4 storage",
            lambda: F.quantize_4bit(A, blocksize=128, quant_type="fp4", quant_storage=torch.bfloat16),
        ),
        ("quantize_4bit nested", lambda: F.quantize_4bit(A, blocksize=64, quant_type="nf4", compress_statistics=True)),
        ("dequantize_4bit", lambda: F.dequantize_4bit(packed, state)),
        ("dequantize_4bit out", lambda: F.dequantize_4bit(packed, state, out=out)),
        ("dequantize_4bit nested", lambda: F.dequantize_4bit(packed2, state2)),
        ("quantize_blockwise", lambda: F.quantize_blockwise(A, blocksize=256)),
        ("quantize_blockwise nested", lambda: F.quantize_blockwise(A, blocksize=256, nested=True)),
        ("dequantize_blockwise", lambda: F.dequantize_blockwise(codes, bstate)),
        ("quantize_int8 tensor", lambda: F.quantize_int8(A)),
        ("quantize_int8 channel", lambda: F.quantize_int8(A, "channel", axis=1)),
        ("quantize_int8 group asym", lambda: F.quantize_int8(A, "group", symmetric=False, group_size=32)),
        ("dequantize_int8", lambda: F.dequantize_int8(q, istate)),
        ("op quantize_4bit", lambda: torch.ops.bnbx.quantize_4bit(A, 64, "nf4", torch.uint8)),
        (
            "op dequantize_4bit",
            lambda: torch.ops.bnbx.dequantize_4bit(packed, state.absmax, 64, "nf4", [64, 96], torch.bfloat16),
        ),
        ("op quantize_blockwise", lambda: torch.ops.bnbx.quantize_blockwise(A, code, 64)),
        (
            "op dequantize_blockwise",
            lambda: torch.ops.bnbx.dequantize_blockwise(codes, bstate.absmax, code, 4096, torch.float32),
        ),
        ("op quantize_int8", lambda: torch.ops.bnbx.quantize_int8(A, 96, False)),
    ]


CPU_CALLS = _calls("cpu")


@pytest.mark.parametrize("index", range(len(CPU_CALLS)), ids=[name for name, _ in CPU_CALLS])
def test_wrappers_build_no_table_per_call(index):
    name, fn = CPU_CALLS[index]
    fn()  # the first call may build and cache tables
    with OpRecorder() as recorder:
        fn()
    bad = [op for op in recorder.ops if op.split(".")[-1] in FORBIDDEN]
    assert not bad, f"{name}: {bad} in {recorder.ops}"
    assert any(op.startswith("bnbx.") for op in recorder.ops), recorder.ops


def test_tables_are_cached_per_device():
    _, s1 = F.quantize_4bit(torch.randn(64), quant_type="fp4")
    _, s2 = F.quantize_4bit(torch.randn(64), quant_type="fp4")
    assert s1.code is s2.code
    # the public functions hand out copies, so callers cannot change the shared table
    table = F.get_4bit_type("fp4")
    table.zero_()
    assert not torch.equal(F.get_4bit_type("fp4"), table)
    dyn = F.create_dynamic_map()
    dyn.zero_()
    assert F.create_dynamic_map().abs().max() == 1.0


def _flatten(result) -> list[torch.Tensor]:
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, (tuple, list)):
        return [t for r in result for t in _flatten(r)]
    tensors = [getattr(result, f) for f in ("absmax", "offset", "scale", "zero_point") if hasattr(result, f)]
    tensors = [t for t in tensors if isinstance(t, torch.Tensor)]
    if getattr(result, "state2", None) is not None:
        tensors += _flatten(result.state2)
    return tensors


@pytest.mark.skipif(not CUDA_READY, reason="needs a CUDA GPU and a bnbx built with CUDA kernels")
def test_cuda_ops_never_synchronise_and_capture_in_graphs():
    calls = _calls("cuda")
    eager = {}
    for name, fn in calls:
        fn()  # warm up: caches, allocator, lazy module loading
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for name, fn in calls:
            eager[name] = _flatten(fn())
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()

    for name, fn in calls:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()  # warm up on the side stream, as torch.cuda.graph's documentation asks
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = _flatten(fn())
        graph.replay()
        torch.cuda.synchronize()
        assert len(captured) == len(eager[name]), name
        for got, want in zip(captured, eager[name]):
            assert_same_bits(got, want, name)
