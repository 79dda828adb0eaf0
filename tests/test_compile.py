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


def test_fake_quant_linear_lsq_compiles_fullgraph():
    # QAT with learned scales: the fused LSQ op (forward and its backward op) and the MinMax activation kernel
    from bnbx.qat import FakeQuantLinear, QATConfig

    layer = FakeQuantLinear.from_linear(torch.nn.Linear(48, 24), QATConfig(w_bits=4, a_bits=8, method="lsq"))
    x = torch.randn(2, 5, 48)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    assert torch.equal(out, layer(x))
    out.square().sum().backward()
    compiled_grad = layer.weight_scale.grad.clone()
    layer.zero_grad()
    layer(x).square().sum().backward()
    assert torch.equal(compiled_grad, layer.weight_scale.grad)


def test_qlora_layer_compiles_fullgraph_with_its_gradients():
    # a LoRA adapter on a 4-bit base: gemm_4bit and the fused adapter op (lora_forward, lora_backward)
    from bnbx import lora
    from bnbx.nn import Linear4bit

    base = Linear4bit.from_linear(torch.nn.Linear(64, 40), compute_dtype=torch.bfloat16)
    layer = lora.LoraLinear(base, r=4, lora_alpha=8, dtype=torch.float32)
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    assert torch.equal(out, layer(x))
    out.float().square().sum().backward()
    compiled_grads = [layer.lora_A.weight.grad.clone(), layer.lora_B.weight.grad.clone()]
    layer.zero_grad()
    layer(x).float().square().sum().backward()
    assert torch.equal(compiled_grads[0], layer.lora_A.weight.grad)
    assert torch.equal(compiled_grads[1], layer.lora_B.weight.grad)
