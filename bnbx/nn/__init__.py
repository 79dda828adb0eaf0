"""Modules with quantized weights."""

from .weight_only import LinearAbsmax8, LinearBlockwise8, LinearZeroPoint8

__all__ = ["LinearAbsmax8", "LinearBlockwise8", "LinearZeroPoint8"]
