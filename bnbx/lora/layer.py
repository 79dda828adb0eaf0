"""``LoraLinear``: a frozen base layer plus a trainable low-rank update ``B @ A * scaling``.

The base may be an ``nn.Linear`` or any quantized linear layer with ``dequantize()`` (bnbx ``Linear4bit``,
``Linear8bitLt``). The base is never modified: ``merge()`` builds a separate dense weight from the decoded
base plus the delta (computed in fp32 and rounded once), and ``unmerge()`` drops it, so the base comes back
bit for bit. (bitsandbytes/peft instead re-quantize the merged weight into the 4-bit base, so merging
rounds twice and unmerging cannot restore the original codes.)
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ._base import FUSED_DTYPES, adapter_input, base_compute_dtype, dense_weight

__all__ = ["AdapterConfig", "LoraLinear"]


@dataclass(frozen=True)
class AdapterConfig:
    """Settings of one LoRA adapter.

    Attributes:
        r: rank, a positive integer.
        lora_alpha: the scale numerator: ``scaling = lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``).
        lora_dropout: dropout probability on the adapter's input, in [0, 1).
        use_rslora: rank-stabilized LoRA scaling (Kalajdzievski 2023).
        dtype: adapter weight dtype; ``None`` means the base layer's compute dtype.
    """

    r: int = 8
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    use_rslora: bool = False
    dtype: Optional[torch.dtype] = None

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, numbers.Integral) or self.r < 1:
            raise ValueError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, numbers.Real):
            raise TypeError(f"lora_alpha must be a number, got {type(self.lora_alpha).__name__}")
        if not math.isfinite(self.lora_alpha) or self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be a positive finite number, got {self.lora_alpha!r}")
        if isinstance(self.lora_dropout, bool) or not isinstance(self.lora_dropout, numbers.Real):
            raise TypeError(f"lora_dropout must be a number, got {type(self.lora_dropout).__name__}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if not isinstance(self.use_rslora, bool):
            raise TypeError(f"use_rslora must be a bool, got {type(self.use_rslora).__name__}")
        if self.dtype is not None and (not isinstance(self.dtype, torch.dtype) or not self.dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating-point torch.dtype or None, got {self.dtype!r}")
        object.__setattr__(self, "r", int(self.r))

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def to_json_dict(self) -> dict[str, Any]:
        items = asdict(self)
        items["dtype"] = None if self.dtype is None else str(self.dtype).removeprefix("torch.")
        return items


class LoraLinear(nn.Module):
    """A frozen linear ``base_layer`` with a LoRA adapter: ``y = base(x) + B(A(dropout(x)) * scaling)``.

    ``lora_A`` is initialised Kaiming-uniform and ``lora_B`` with zeros, so a fresh adapter changes nothing.
    The adapter's weights are stored in ``config.dtype`` (default: the base's compute dtype). Forward and backward
    run as one op each (``torch.ops.bnbx.lora_forward`` / ``lora_backward``): the adapter's products in fp32 on the
    activations in their own dtype, added to the base output before its one rounding to the base output's dtype.
    """

    def __init__(self, base_layer: nn.Module, config: Optional[AdapterConfig] = None, **kwargs: Any) -> None:
        super().__init__()
        if isinstance(base_layer, LoraLinear):
            raise ValueError("LoraLinear: the base layer already has a LoRA adapter")
        if not isinstance(base_layer, nn.Module):
            raise TypeError(f"LoraLinear: base_layer must be an nn.Module, got {type(base_layer).__name__}")
        in_features = getattr(base_layer, "in_features", None)
        out_features = getattr(base_layer, "out_features", None)
        if not isinstance(in_features, int) or not isinstance(out_features, int):
            raise TypeError(
                f"LoraLinear: {type(base_layer).__name__} has no integer in_features/out_features; "
                "only linear layers can carry an adapter"
            )
        if config is None:
            config = AdapterConfig(**kwargs)
        elif kwargs:
            raise TypeError("LoraLinear: pass either config or keyword settings, not both")
        self.config = config
        self.base_layer = base_layer
        self.in_features, self.out_features = in_features, out_features
        self.scaling = config.scaling
        dtype = config.dtype or base_compute_dtype(base_layer)
        device = _device_of(base_layer)
        self.lora_A = nn.Linear(in_features, config.r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(config.r, out_features, bias=False, device=device, dtype=dtype)
        self.lora_dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.merged_weight: Optional[torch.Tensor]
        self.register_buffer("merged_weight", None, persistent=False)
        self.reset_lora_parameters()

    # -- what peft, transformers and users read from a linear layer --------------------------------------------

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's (possibly packed) weight."""
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return getattr(self.base_layer, "bias", None)

    @property
    def merged(self) -> bool:
        return self.merged_weight is not None

    def reset_lora_parameters(self) -> None:
        """A: Kaiming-uniform (as ``nn.Linear`` initialises), B: zeros."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``B @ A * scaling`` as ``[out_features, in_features]``, computed in fp32 and cast to ``dtype``."""
        delta = self.lora_B.weight.detach().float() @ self.lora_A.weight.detach().float()
        return (delta * self.scaling).to(dtype)

    def merged_dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The decoded base weight plus the delta, summed in fp32 and rounded once to ``dtype``."""
        return (dense_weight(self.base_layer, torch.float32) + self.delta_weight(torch.float32)).to(dtype)

    def merge(self, safe_merge: bool = False) -> None:
        """Compute ``base + delta`` once into a dense weight that forward then uses (one matmul instead of
        three). The base layer is left untouched; :meth:`unmerge` restores the unmerged layer exactly.

        For a quantized base this holds a dense copy of the weight while merged; for a dense model to
        save or serve, use :func:`bnbx.lora.merge_and_unload`.
        """
        if self.merged:
            warnings.warn("LoraLinear.merge: the adapter is already merged; nothing to do", stacklevel=2)
            return
        merged = self.merged_dense_weight(base_compute_dtype(self.base_layer))
        if safe_merge and not bool(torch.isfinite(merged).all()):
            raise ValueError("LoraLinear.merge: the merged weight holds NaN or Inf; the adapter seems broken")
        self.merged_weight = merged

    def unmerge(self) -> None:
        """Drop the merged weight: forward goes back to ``base(x) + adapter(x)``, the base unchanged bit for bit."""
        if not self.merged:
            warnings.warn("LoraLinear.unmerge: the adapter is not merged; nothing to do", stacklevel=2)
            return
        self.merged_weight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1:] != (self.in_features,):
            raise ValueError(
                f"LoraLinear: input has {x.shape[-1] if x.dim() else 0} features, expected {self.in_features}"
            )
        if self.merged_weight is not None:
            weight = self.merged_weight
            bias = self.bias
            out = F.linear(x.to(weight.dtype), weight, None if bias is None else bias.to(weight.dtype))
            return out.to(x.dtype)
        result = self.base_layer(x)
        lora_A, lora_B = self.lora_A.weight, self.lora_B.weight
        inputs = adapter_input(x, self.lora_dropout, lora_A.dtype)
        if FUSED_DTYPES.issuperset((inputs.dtype, result.dtype, lora_A.dtype)):
            # one op: the adapter's products in fp32 on the activations in their own dtype, added to the base's
            # output before its one rounding (csrc/cpu/lora.cpp)
            return torch.ops.bnbx.lora_forward(inputs, result, lora_A, lora_B, self.scaling)
        # other dtypes (float64, for gradcheck): the same sum in plain torch
        update = F.linear(F.linear(inputs.to(lora_A.dtype), lora_A) * self.scaling, lora_B)
        return result + update.to(result.dtype)

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"r={c.r}, lora_alpha={c.lora_alpha:g}, scaling={self.scaling:g}, lora_dropout={c.lora_dropout:g}, "
            f"use_rslora={c.use_rslora}, dtype={self.lora_A.weight.dtype}, merged={self.merged}"
        )


def _device_of(module: nn.Module) -> Optional[torch.device]:
    for tensor in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
        return tensor.device
    return None
