"""Modules with quantized weights: :class:`Linear4bit` (NF4/FP4, QLoRA's frozen base layer) and its variants."""

from .linear4bit import Linear4bit, LinearFP4, LinearNF4, Params4bit

__all__ = ["Linear4bit", "LinearFP4", "LinearNF4", "Params4bit"]
