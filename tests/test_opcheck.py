"""torch.library.opcheck on every bnbx op (schema, fake kernel, dispatch, autograd registration)."""

from __future__ import annotations

import pytest
import torch

import bnbx  # noqa: F401  (registers the ops)
from bnbx import _library
from bnbx import functional as F
from conftest import DEVICES, DTYPES, dtype_id


CPU_ONLY_OPS = {"bnbx::int8_pack_weight", "bnbx::int8_mixed_linear_packed"}
PACKED_OPS_RUN = _library.cpu_capability() == "avx512"


def samples(device: str, dtype: torch.dtype):
    """(op, args, kwargs) triples covering odd sizes, partial blocks and empty tensors."""
    code = F.create_dynamic_map().to(device)
    for shape in [(7,), (197,), (3, 5, 64), (0,)]:
        A = torch.randn(shape, dtype=dtype, device=device)
        for quant_type in ("nf4", "fp4"):
            yield torch.ops.bnbx.quantize_4bit.default, (A, 64, quant_type, torch.uint8), {}
            # Float storage reinterprets code bytes; random codes make NaN bit patterns, which opcheck's output
            # comparison counts as different, so that sample uses zeros: bytes 0x77 (NF4) or 0x00 (FP4). Float
            # storage of random data is checked bit for bit in test_quantize_4bit.py.
            zeros = torch.zeros(shape, dtype=dtype, device=device)
            yield torch.ops.bnbx.quantize_4bit.default, (zeros, 64, quant_type, torch.bfloat16), {}
            packed, absmax = torch.ops.bnbx.quantize_4bit(A, 64, quant_type, torch.uint8)
            yield torch.ops.bnbx.dequantize_4bit.default, (packed, absmax, 64, quant_type, list(shape), dtype), {}
            out = torch.empty(shape, dtype=dtype, device=device)
            yield torch.ops.bnbx.dequantize_4bit.out, (packed, absmax, 64, quant_type, list(shape), dtype), {"out": out}
        yield torch.ops.bnbx.quantize_blockwise.default, (A, code, 64), {}
        codes, absmax = torch.ops.bnbx.quantize_blockwise(A, code, 64)
        yield torch.ops.bnbx.dequantize_blockwise.default, (codes, absmax, code, 64, dtype), {}
        yield torch.ops.bnbx.double_quantize.default, (absmax, code, 256), {}
        for symmetric in (True, False):
            yield torch.ops.bnbx.quantize_int8.default, (A, 32, symmetric), {}
            q, scale, zero_point = torch.ops.bnbx.quantize_int8(A, 32, symmetric)
            yield torch.ops.bnbx.dequantize_int8.default, (q, scale, zero_point, 32, dtype), {}
    # LLM.int8() (more cases in test_int8_matmul.py::test_opcheck)
    A = torch.randn(5, 70, dtype=dtype, device=device)
    A[:, 3] *= 20
    CB, SCB, _ = torch.ops.bnbx.int8_vectorwise_quant(torch.randn(9, 70, dtype=dtype, device=device), 0.0)
    q, stats, _ = torch.ops.bnbx.int8_vectorwise_quant(A, 6.0)
    C = torch.ops.bnbx.int8_linear_matmul(q, CB)
    yield torch.ops.bnbx.int8_vectorwise_quant.default, (A, 6.0), {}
    yield torch.ops.bnbx.int8_vectorwise_dequant.default, (q, stats), {}
    yield torch.ops.bnbx.int8_linear_matmul.default, (q, CB), {}
    yield torch.ops.bnbx.int8_mm_dequant.default, (C, stats, SCB, dtype, None), {}
    yield torch.ops.bnbx.int8_mixed_linear.default, (A, CB, SCB, None, 6.0), {}
    if device == "cpu" and PACKED_OPS_RUN:  # CPU-only ops (the AMX weight layout, packed by the AVX-512 kernels)
        packed = torch.ops.bnbx.int8_pack_weight(CB)
        yield torch.ops.bnbx.int8_pack_weight.default, (CB,), {}
        yield torch.ops.bnbx.int8_mixed_linear_packed.default, (A, CB, packed, SCB, None, 6.0), {}
    # gemm_4bit: A [..., K] against a packed [N, K] weight (GEMV rows, odd K, nested statistics)
    for M, K, nested in [(1, 128, True), (5, 65, False)]:
        packed, state = F.quantize_4bit(torch.randn(9, K, device=device), quant_type="nf4", compress_statistics=nested)
        A = torch.randn(M, K, dtype=dtype, device=device)
        s2 = state.state2
        extra = (s2.absmax, s2.code, state.offset, s2.blocksize) if nested else ()
        yield torch.ops.bnbx.gemm_4bit.default, (A, packed, state.absmax, 64, "nf4", [9, K], None, *extra), {}
    # QAT fake quantization (more cases in tests/qat/test_fake_quant.py)
    x = torch.randn(6, 20, dtype=dtype, device=device, requires_grad=True)
    yield torch.ops.bnbx.fake_quantize.default, (x, 7, 4, False, True, "range", 1.0), {}
    x = torch.randn(4, 64, dtype=dtype, device=device, requires_grad=True)
    scale = torch.full((4, 1), 0.2, dtype=dtype, device=device, requires_grad=True)
    offset = torch.zeros((4, 1), dtype=dtype, device=device, requires_grad=True)
    yield torch.ops.bnbx.fake_quantize_lsq.default, (x, scale, offset, -7.0, 7.0, 0.1), {}
    # LSQ per tensor (odd size, fp32 scale) and per token, empty; the backward op on its own
    for shape, scale_shape in [((3, 5, 33), ()), ((3, 5, 33), (3, 5, 1)), ((0, 16), (0, 1))]:
        x = torch.randn(shape, dtype=dtype, device=device, requires_grad=True)
        scale = (torch.rand(scale_shape, device=device) + 0.1).requires_grad_()
        offset = torch.zeros(scale_shape, device=device, requires_grad=True)
        yield torch.ops.bnbx.fake_quantize_lsq.default, (x, scale, offset, -8.0, 7.0, 0.5), {}
        grad = torch.randn(shape, dtype=dtype, device=device)
        args = (grad, x.detach(), scale.detach(), offset.detach(), -8.0, 7.0, 0.5)
        yield torch.ops.bnbx.fake_quantize_lsq_backward.default, args, {}
    yield torch.ops.bnbx.fake_quantize_4bit.default, (x, 64, "nf4"), {}
    # LoRA adapter products (more cases in tests/lora/test_lora_ops.py): leading sizes, odd sizes, empty rows
    for lead, K, N, r in [((2, 3), 37, 29, 5), ((0,), 8, 6, 2)]:
        x = torch.randn(*lead, K, dtype=dtype, device=device, requires_grad=True)
        base = torch.randn(*lead, N, dtype=dtype, device=device, requires_grad=True)
        lora_A = torch.randn(r, K, device=device, requires_grad=True)
        lora_B = torch.randn(N, r, device=device, requires_grad=True)
        yield torch.ops.bnbx.lora_forward.default, (x, base, lora_A, lora_B, 2.0), {}
        grad = torch.randn(*lead, N, dtype=dtype, device=device)
        for input_grad in (True, False):
            args = (grad, x.detach(), lora_A.detach(), lora_B.detach(), 2.0, input_grad)
            yield torch.ops.bnbx.lora_backward.default, args, {}


def sample_id(sample) -> str:
    op, args, _ = sample
    return f"{op.name()}-{'x'.join(map(str, args[0].shape))}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_opcheck_every_op(device, dtype):
    checked = set()
    for op, args, kwargs in samples(device, dtype):
        torch.library.opcheck(op, args, kwargs)
        checked.add(op.name())
    registered = {f"bnbx::{name}" for name in dir(torch.ops.bnbx) if not name.startswith("_")}
    if device != "cpu" or not PACKED_OPS_RUN:
        registered -= CPU_ONLY_OPS
    assert {name.split(".")[0] for name in checked} >= registered - {"bnbx::name"}
