"""Bad input gets a clear exception with the same words from the fake kernel, the CPU kernel and CUDA."""

from __future__ import annotations

import pytest
import torch

import bnbx
from bnbx import functional as F
from conftest import CUDA_READY

ops = torch.ops.bnbx
CODE = F.create_dynamic_map()


def packed_for(n: int, blocksize: int = 64):
    return ops.quantize_4bit(torch.randn(n), blocksize, "nf4", torch.uint8)


# (name, callable taking a device, exception type, message fragment)
BAD_OP_CALLS = [
    ("int8 input", lambda d: ops.quantize_4bit(torch.ones(8, dtype=torch.int8, device=d), 64, "nf4", torch.uint8),
     TypeError, "quantize_4bit: A must be float32, float16 or bfloat16, got int8"),
    ("float64 input", lambda d: ops.quantize_4bit(torch.ones(8, dtype=torch.float64, device=d), 64, "nf4", torch.uint8),
     TypeError, "A must be float32, float16 or bfloat16, got float64"),
    ("complex input",
     lambda d: ops.quantize_4bit(torch.ones(8, dtype=torch.complex64, device=d), 64, "nf4", torch.uint8),
     TypeError, "A must be float32, float16 or bfloat16, got"),
    ("bool input", lambda d: ops.quantize_blockwise(torch.ones(8, dtype=torch.bool, device=d), CODE.to(d), 64),
     TypeError, "quantize_blockwise: A must be float32, float16 or bfloat16, got bool"),
    ("blocksize 0", lambda d: ops.quantize_4bit(torch.ones(8, device=d), 0, "nf4", torch.uint8),
     ValueError, "blocksize must be a power of two from 32 to 4096, got 0"),
    ("blocksize 7", lambda d: ops.quantize_4bit(torch.ones(8, device=d), 7, "nf4", torch.uint8),
     ValueError, "got 7"),
    ("blocksize 48", lambda d: ops.quantize_4bit(torch.ones(8, device=d), 48, "nf4", torch.uint8),
     ValueError, "got 48"),
    ("blocksize -64", lambda d: ops.quantize_4bit(torch.ones(8, device=d), -64, "nf4", torch.uint8),
     ValueError, "got -64"),
    ("blocksize 2**62", lambda d: ops.quantize_4bit(torch.ones(8, device=d), 2**62, "nf4", torch.uint8),
     ValueError, "blocksize must be a power of two"),
    ("blocksize 32768", lambda d: ops.quantize_blockwise(torch.ones(8, device=d), CODE.to(d), 32768),
     ValueError, "quantize_blockwise: blocksize must be a power of two from 32 to 16384, got 32768"),
    ("4-bit blocksize 8192", lambda d: ops.quantize_4bit(torch.ones(8, device=d), 8192, "nf4", torch.uint8),
     ValueError, "quantize_4bit: blocksize must be a power of two from 32 to 4096, got 8192"),
    ("quant_type int4", lambda d: ops.quantize_4bit(torch.ones(8, device=d), 64, "int4", torch.uint8),
     ValueError, "quant_type must be 'nf4' or 'fp4', got 'int4'"),
    ("storage float64", lambda d: ops.quantize_4bit(torch.ones(8, device=d), 64, "nf4", torch.float64),
     TypeError, "quant_storage must be uint8, int8, float16, bfloat16 or float32, got float64"),
    ("dequant shape 4x too large", lambda d: ops.dequantize_4bit(
        *[t.to(d) for t in packed_for(128)], 64, "nf4", [4, 128], torch.float32),
     ValueError, "A holds 64 bytes of packed codes but shape [4, 128] needs 256"),
    ("dequant packed one byte short", lambda d: ops.dequantize_4bit(
        packed_for(128)[0][:-1].to(d), packed_for(128)[1].to(d), 64, "nf4", [128], torch.float32),
     ValueError, "A holds 63 bytes"),
    ("dequant absmax truncated", lambda d: ops.dequantize_4bit(
        packed_for(1024)[0].to(d), packed_for(1024)[1][:4].to(d), 64, "nf4", [1024], torch.float32),
     ValueError, "absmax must hold one value per block (16 values), got 4"),
    ("dequant absmax fp16", lambda d: ops.dequantize_4bit(
        packed_for(128)[0].to(d), packed_for(128)[1].half().to(d), 64, "nf4", [128], torch.float32),
     TypeError, "dequantize_4bit: absmax must be float32, got float16"),
    ("dequant negative shape", lambda d: ops.dequantize_4bit(
        *[t.to(d) for t in packed_for(128)], 64, "nf4", [-128], torch.float32),
     ValueError, "shape must not hold negative sizes"),
    ("dequant output int8", lambda d: ops.dequantize_4bit(
        *[t.to(d) for t in packed_for(128)], 64, "nf4", [128], torch.int8),
     TypeError, "dequantize_4bit: dtype must be float32, float16 or bfloat16, got int8"),
    ("dequant out wrong shape", lambda d: ops.dequantize_4bit.out(
        *[t.to(d) for t in packed_for(128)], 64, "nf4", [128], torch.float32, out=torch.empty(127, device=d)),
     ValueError, "out must have shape [128] and dtype float32"),
    ("8-bit code of 255", lambda d: ops.quantize_blockwise(torch.ones(8, device=d), CODE[:255].to(d), 64),
     ValueError, "code must hold 256 values, got 255"),
    ("8-bit code fp16", lambda d: ops.quantize_blockwise(torch.ones(8, device=d), CODE.half().to(d), 64),
     TypeError, "code must be float32, got float16"),
    ("8-bit dequant float codes", lambda d: ops.dequantize_blockwise(
        torch.ones(8, device=d), torch.ones(1, device=d), CODE.to(d), 64, torch.float32),
     TypeError, "dequantize_blockwise: A must be uint8 codes, got float32"),
    ("8-bit dequant absmax truncated", lambda d: ops.dequantize_blockwise(
        torch.ones(200, dtype=torch.uint8, device=d), torch.ones(3, device=d), CODE.to(d), 64, torch.float32),
     ValueError, "absmax must hold one value per block (4 values), got 3"),
    ("int8 group_size 0", lambda d: ops.quantize_int8(torch.ones(8, device=d), 0, True),
     ValueError, "quantize_int8: group_size must be at least 1, got 0"),
    ("int8 dequant scale truncated", lambda d: ops.dequantize_int8(
        torch.ones(8, dtype=torch.int8, device=d), torch.ones(1, device=d), torch.zeros(2, dtype=torch.int32, device=d),
        4, torch.float32),
     ValueError, "dequantize_int8: scale must hold one value per block (2 values), got 1"),
    ("int8 dequant zero_point int64", lambda d: ops.dequantize_int8(
        torch.ones(8, dtype=torch.int8, device=d), torch.ones(2, device=d), torch.zeros(2, dtype=torch.int64, device=d),
        4, torch.float32),
     TypeError, "zero_point must be int32, got int64"),
    ("int8 dequant float q", lambda d: ops.dequantize_int8(
        torch.ones(8, device=d), torch.ones(2, device=d), torch.zeros(2, dtype=torch.int32, device=d), 4,
        torch.float32),
     TypeError, "dequantize_int8: A must be int8, got float32"),
    # LSQ (csrc/common/checks_fake_quant.h and bnbx/_ops_qat.py)
    ("lsq scale per column", lambda d: ops.fake_quantize_lsq(
        torch.ones(4, 10, device=d), torch.ones(1, 10, device=d), torch.zeros((), device=d), -7.0, 7.0),
     ValueError, "fake_quantize_lsq: scale of shape [1, 10] must hold one value or one per row of x of shape "
     "[4, 10]: x's leading sizes followed by ones, e.g. [4, 1]"),
    ("lsq int x", lambda d: ops.fake_quantize_lsq(
        torch.ones(4, 10, dtype=torch.int32, device=d), torch.ones(4, 1, device=d), torch.zeros((), device=d), -7.0,
        7.0),
     TypeError, "fake_quantize_lsq: x must be float32, float16, bfloat16 or float64, got int32"),
    ("lsq qmin > qmax", lambda d: ops.fake_quantize_lsq(
        torch.ones(4, 10, device=d), torch.ones(4, 1, device=d), torch.zeros((), device=d), 7.0, -7.0),
     ValueError, "fake_quantize_lsq: qmin and qmax must be finite with qmin < qmax, got qmin=7, qmax=-7"),
    ("lsq scale and offset rows", lambda d: ops.fake_quantize_lsq(
        torch.ones(4, 10, device=d), torch.ones(4, 1, device=d), torch.zeros(4, 10, device=d), -7.0, 7.0),
     ValueError, "scale of shape [4, 1] and offset of shape [4, 10] must have as many values"),
    ("lsq grad_scale nan", lambda d: ops.fake_quantize_lsq(
        torch.ones(4, 10, device=d), torch.ones(4, 1, device=d), torch.zeros((), device=d), -7.0, 7.0, float("nan")),
     ValueError, "fake_quantize_lsq: grad_scale must be finite, got nan"),
    ("lsq backward grad shape", lambda d: ops.fake_quantize_lsq_backward(
        torch.ones(4, 9, device=d), torch.ones(4, 10, device=d), torch.ones(4, 1, device=d),
        torch.zeros((), device=d), -7.0, 7.0, 1.0),
     ValueError, "fake_quantize_lsq_backward: grad must have x's shape [4, 10] and dtype float32, got [4, 9] float32"),
    ("lora int x", lambda d: ops.lora_forward(
        torch.ones(2, 4, dtype=torch.int32, device=d), torch.ones(2, 3, device=d), torch.ones(2, 4, device=d),
        torch.ones(3, 2, device=d), 1.0),
     TypeError, "lora_forward: x must be float32, float16 or bfloat16, got int32"),
    ("lora mixed adapter dtypes", lambda d: ops.lora_forward(
        torch.ones(2, 4, device=d), torch.ones(2, 3, device=d), torch.ones(2, 4, device=d),
        torch.ones(3, 2, dtype=torch.bfloat16, device=d), 1.0),
     TypeError, "lora_forward: lora_B must have lora_A's dtype float32, got bfloat16"),
    ("lora rank 0", lambda d: ops.lora_forward(
        torch.ones(2, 4, device=d), torch.ones(2, 3, device=d), torch.ones(0, 4, device=d),
        torch.ones(3, 0, device=d), 1.0),
     ValueError, "lora_forward: lora_A must be [r, in_features] with r >= 1, got shape [0, 4]"),
    ("lora B rank", lambda d: ops.lora_forward(
        torch.ones(2, 4, device=d), torch.ones(2, 3, device=d), torch.ones(2, 4, device=d),
        torch.ones(3, 5, device=d), 1.0),
     ValueError, "lora_forward: lora_B must be [out_features, 2] (r = lora_A's rows), got shape [3, 5]"),
    ("lora in_features", lambda d: ops.lora_forward(
        torch.ones(2, 5, device=d), torch.ones(2, 3, device=d), torch.ones(2, 4, device=d),
        torch.ones(3, 2, device=d), 1.0),
     ValueError,
     "lora_forward: x's last dimension must equal in_features (4, lora_A's columns), got x of shape [2, 5]"),
    ("lora base rows", lambda d: ops.lora_forward(
        torch.ones(2, 4, device=d), torch.ones(3, 3, device=d), torch.ones(2, 4, device=d),
        torch.ones(3, 2, device=d), 1.0),
     ValueError, "lora_forward: base must have x's leading sizes and out_features (3, lora_B's rows) last, got base "
     "of shape [3, 3] for x of shape [2, 4]"),
    ("lora backward grad", lambda d: ops.lora_backward(
        torch.ones(2, 2, device=d), torch.ones(2, 4, device=d), torch.ones(2, 4, device=d),
        torch.ones(3, 2, device=d), 1.0, True),
     ValueError, "lora_backward: grad_out must have x's leading sizes and out_features (3, lora_B's rows) last"),
    ("lora scaling inf", lambda d: ops.lora_forward(
        torch.ones(2, 4, device=d), torch.ones(2, 3, device=d), torch.ones(2, 4, device=d),
        torch.ones(3, 2, device=d), float("inf")),
     ValueError, "lora_forward: scaling must be finite, got inf"),
]

DEVICES = ["cpu", "meta", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA_READY, reason="needs CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", BAD_OP_CALLS, ids=[case[0] for case in BAD_OP_CALLS])
def test_bad_op_input_same_error_on_every_backend(device, case):
    # "meta" runs the Python fake kernel; "cpu" and "cuda" the C++ checks. Same type, same words.
    _, call, error, message = case
    with pytest.raises(error, match=_literal(message)):
        call(device)


def _literal(message: str) -> str:
    import re

    return re.escape(message)


@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA_READY, reason="CUDA"))]
)
def test_device_mismatch(device):
    packed, absmax = packed_for(128)
    other = "cuda" if device == "cpu" else "cpu"
    if other == "cuda" and not CUDA_READY:
        other = "meta"
    with pytest.raises(RuntimeError, match="expected all tensors on the same device|same device"):
        ops.dequantize_4bit(packed.to(device), absmax.to(other), 64, "nf4", [128], torch.float32)


def test_functional_rejects_bad_input_before_the_kernel():
    with pytest.raises(TypeError, match="A must be a torch.Tensor"):
        F.quantize_4bit([1.0, 2.0])
    with pytest.raises(TypeError, match="got int64"):
        F.quantize_4bit(torch.arange(8))
    with pytest.raises(ValueError, match="pass quant_state, or both absmax and out"):
        F.dequantize_4bit(torch.zeros(4, 1, dtype=torch.uint8))
    with pytest.raises(TypeError, match="quant_state must be a bnbx.QuantState or a bitsandbytes QuantState"):
        F.dequantize_4bit(torch.zeros(4, 1, dtype=torch.uint8), quant_state={"absmax": 1})
    packed, state = F.quantize_4bit(torch.randn(64, 64))
    state.shape = torch.Size([64, 640])  # a state that does not match the packed tensor
    with pytest.raises(ValueError, match="bytes of packed codes"):
        F.dequantize_4bit(packed, state)


@pytest.mark.skipif(bnbx.cuda_built(), reason="only a CPU-only build lacks the CUDA kernels")
@pytest.mark.parametrize("op_name", ["quantize_4bit", "dequantize_4bit", "quantize_blockwise", "quantize_int8"])
def test_cuda_tensors_with_a_cpu_only_build_say_how_to_rebuild(op_name):
    # no GPU here, so send CPU tensors to the CUDA kernel slot directly: it must explain, not crash
    A = torch.randn(64)
    packed, absmax = packed_for(64)
    args = {
        "quantize_4bit": (A, 64, "nf4", torch.uint8),
        "dequantize_4bit": (packed, absmax, 64, "nf4", [64], torch.float32),
        "quantize_blockwise": (A, CODE, 64),
        "quantize_int8": (A, 32, True),
    }[op_name]
    op = getattr(ops, op_name).default
    with pytest.raises(RuntimeError, match="built without CUDA kernels. Rebuild .*--no-build-isolation"):
        op.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA), *args)
