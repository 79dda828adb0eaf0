"""Modules with quantized weights: :class:`Linear4bit` (NF4/FP4, QLoRA's frozen base layer) and its variants,
and the weight-only 8-bit layers (:mod:`bnbx.nn.weight_only`)."""

from .linear4bit import Linear4bit, LinearFP4, LinearNF4, Params4bit
from .weight_only import LinearAbsmax8, LinearBlockwise8, LinearZeroPoint8

__all__ = ["Linear4bit", "LinearAbsmax8", "LinearBlockwise8", "LinearFP4", "LinearNF4", "LinearZeroPoint8",
           "Params4bit"]
