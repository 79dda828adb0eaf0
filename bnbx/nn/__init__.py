"""Quantized ``nn.Module`` layers with bitsandbytes' names and state_dict keys."""

from .linear8bit import Int8Params, Linear8bitLt

__all__ = ["Int8Params", "Linear8bitLt"]
