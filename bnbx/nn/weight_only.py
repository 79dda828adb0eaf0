"""Weight-only 8-bit linear layers: the weight is stored quantized and dequantized at every forward.

Three classic formats, for comparing against NF4/FP4 and LLM.int8() (``bnbx demo``):

- :class:`LinearAbsmax8`: symmetric int8, one absmax scale per output channel (``scale = absmax / 127``).
- :class:`LinearZeroPoint8`: asymmetric int8 with a zero point per output channel (``scale = range / 255``).
- :class:`LinearBlockwise8`: bitsandbytes' 8-bit blockwise format (signed dynamic map, absmax per block).

They store codes with bnbx's ops (:func:`bnbx.quantize_int8`, :func:`bnbx.quantize_blockwise`) and compute
``x @ dequantize(W).T + b`` in the input's dtype: the memory is 8 bits per weight plus the scales, the
arithmetic is the float one. State dict keys: ``weight`` (the codes), ``weight_scale`` and
``weight_zero_point`` (per channel) or ``weight_absmax`` (per block), and ``bias``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import functional

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


class _WeightOnlyLinear(nn.Module):
    """Shared parts: shapes, bias, forward through ``dequantize``, conversion from ``nn.Linear``. Subclasses
    define ``quantize_(weight)`` and ``dequantize(dtype)``."""

    method = ""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 dtype: torch.dtype = torch.float32, device: Optional[torch.device | str] = None) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{type(self).__name__}: {name} must be a positive integer, got {value!r}")
        if dtype not in _FLOATS:
            raise TypeError(f"{type(self).__name__}: dtype must be float32, float16 or bfloat16, got {dtype}")
        self.in_features = in_features
        self.out_features = out_features
        self.dtype = dtype  # the dtype dequantize() returns by default (the original weight's)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> "_WeightOnlyLinear":
        """A quantized copy of ``linear`` (on its device); ``linear`` is not modified."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{cls.__name__}.from_linear: expected an nn.Linear, got {type(linear).__name__}")
        weight = linear.weight.detach()
        if weight.dtype not in _FLOATS:
            raise TypeError(f"{cls.__name__}.from_linear: the weight must be float32, float16 or bfloat16, "
                            f"got {weight.dtype}")
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, dtype=weight.dtype,
                     device=weight.device, **kwargs)
        module.quantize_(weight)
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{type(self).__name__}: input must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__}: input's last dimension must equal in_features "
                             f"({self.in_features}), got input of shape {list(x.shape)}")
        weight = self.dequantize(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, weight, bias)

    def _check_weight(self, weight: torch.Tensor) -> None:
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"{type(self).__name__}: weight must have shape {[self.out_features, self.in_features]}, "
                             f"got {list(weight.shape)}")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"method={self.method}, dtype={self.dtype}")


class LinearAbsmax8(_WeightOnlyLinear):
    """int8 weight, symmetric, one scale per output channel: ``W ~ q * scale[row]``, q in [-127, 127]."""

    method = "absmax8"
    symmetric = True

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 dtype: torch.dtype = torch.float32, device: Optional[torch.device | str] = None) -> None:
        super().__init__(in_features, out_features, bias, dtype, device)
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=torch.int8, device=device),
                                   requires_grad=False)
        self.register_buffer("weight_scale", torch.zeros(out_features, dtype=torch.float32, device=device))
        self.register_buffer("weight_zero_point", torch.zeros(out_features, dtype=torch.int32, device=device))

    def quantize_(self, weight: torch.Tensor) -> None:
        """Replace the stored weight by ``weight`` quantized."""
        self._check_weight(weight)
        q, state = functional.quantize_int8(weight, "channel", symmetric=self.symmetric, axis=0)
        self.weight = nn.Parameter(q, requires_grad=False)
        self.weight_scale = state.scale
        self.weight_zero_point = state.zero_point

    def _state(self) -> functional.Int8QuantState:
        return functional.Int8QuantState(self.weight_scale, self.weight_zero_point, "channel", 0, 128,
                                         self.symmetric, self.dtype)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The dense ``[out_features, in_features]`` weight in ``dtype`` (default: the original dtype)."""
        return functional.dequantize_int8(self.weight.data, self._state(), dtype or self.dtype)


class LinearZeroPoint8(LinearAbsmax8):
    """int8 weight, asymmetric, scale and zero point per output channel: ``W ~ (q - zp[row]) * scale[row]``."""

    method = "zeropoint8"
    symmetric = False


class LinearBlockwise8(_WeightOnlyLinear):
    """bitsandbytes' 8-bit blockwise format: uint8 codes into the signed dynamic map, one fp32 absmax per
    block of ``blocksize`` consecutive weights (row-major)."""

    method = "blockwise8"

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 dtype: torch.dtype = torch.float32, device: Optional[torch.device | str] = None,
                 blocksize: int = 256) -> None:
        super().__init__(in_features, out_features, bias, dtype, device)
        self.blocksize = blocksize
        blocks = -(-in_features * out_features // blocksize)
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=torch.uint8, device=device),
                                   requires_grad=False)
        self.register_buffer("weight_absmax", torch.zeros(blocks, dtype=torch.float32, device=device))

    def quantize_(self, weight: torch.Tensor) -> None:
        """Replace the stored weight by ``weight`` quantized."""
        self._check_weight(weight)
        codes, state = functional.quantize_blockwise(weight, blocksize=self.blocksize)
        self.weight = nn.Parameter(codes, requires_grad=False)
        self.weight_absmax = state.absmax

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The dense ``[out_features, in_features]`` weight in ``dtype`` (default: the original dtype)."""
        dense = functional.dequantize_blockwise(self.weight.data, absmax=self.weight_absmax,
                                                blocksize=self.blocksize)
        return dense.to(dtype or self.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", blocksize={self.blocksize}"


WEIGHT_ONLY_CLASSES = {cls.method: cls for cls in (LinearAbsmax8, LinearZeroPoint8, LinearBlockwise8)}
