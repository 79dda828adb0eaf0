"""Quantization-aware training: fused fake-quant ops, QAT of weights, activations and the KV cache, data-free
distillation, and an exact convert to deployable layers.

    from bnbx.qat import QATConfig, prepare, convert, generate_data, distill
    student = prepare(model, QATConfig(w_bits=4, a_bits=8, kv_bits=4))
    distill(student, teacher, generate_data(teacher, tokenizer, 64, 128))
    deployable = convert(student)
"""

from .config import QATConfig
from .distill import distill, generate_data, kd_loss
from .kv import KVFakeQuant
from .modules import ActFakeQuant, FakeQuantLinear, QuantizedLinear
from .ops import fake_quantize, fake_quantize_4bit, fake_quantize_lsq, lsq_init_scale
from .prepare import convert, prepare

__all__ = [
    "ActFakeQuant",
    "FakeQuantLinear",
    "KVFakeQuant",
    "QATConfig",
    "QuantizedLinear",
    "convert",
    "distill",
    "fake_quantize",
    "fake_quantize_4bit",
    "fake_quantize_lsq",
    "generate_data",
    "kd_loss",
    "lsq_init_scale",
    "prepare",
]
