"""Modules with quantized weights, with bitsandbytes' names and state_dict keys: :class:`Linear4bit` (NF4/FP4,
QLoRA's frozen base layer) and its variants, :class:`Linear8bitLt` (LLM.int8()), and the weight-only 8-bit
layers of :mod:`bnbx.nn.weight_only`."""

from .linear4bit import Linear4bit, LinearFP4, LinearNF4, Params4bit
from .linear8bit import Int8Params, Linear8bitLt
from .weight_only import LinearAbsmax8, LinearBlockwise8, LinearZeroPoint8

__all__ = ["Int8Params", "Linear4bit", "Linear8bitLt", "LinearAbsmax8", "LinearBlockwise8", "LinearFP4",
           "LinearNF4", "LinearZeroPoint8", "Params4bit"]
