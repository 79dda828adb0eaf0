"""FakeQuantLinear (QAT) and the deployable layers convert() produces from it."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import _ops_qat
from ..functional import Int8QuantState, dequantize_4bit, dequantize_int8, quantize_4bit
from .config import QATConfig
from .ops import fake_quantize, fake_quantize_4bit, fake_quantize_lsq, lsq_init_scale


class ActFakeQuant(nn.Module):
    """Dynamic MinMax fake quantization of activations (per token by default), straight-through gradient."""

    def __init__(
        self,
        bits: int,
        granularity: str = "token",
        symmetric: bool = True,
        range: str = "restricted",
        mask: str = "none",
    ) -> None:
        super().__init__()
        self.bits, self.granularity, self.symmetric, self.range, self.mask = bits, granularity, symmetric, range, mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == 0:
            return x
        return fake_quantize(x, self.bits, self.symmetric, self.granularity, range=self.range, mask=self.mask)

    def extra_repr(self) -> str:
        kind = "symmetric" if self.symmetric else "asymmetric"
        return f"bits={self.bits}, granularity={self.granularity}, {kind}, range={self.range}"


class FakeQuantLinear(nn.Linear):
    """``nn.Linear`` whose weight (per output channel by default) and input (per token) are fake-quantized.

    Keeps the ``weight``/``bias`` parameters and state_dict keys of the Linear it replaces; with
    ``method="lsq"`` it also learns ``weight_scale`` ([out_features, 1], LSQ gradient). :meth:`quantized_weight`
    is exactly the weight the forward uses, and what :func:`bnbx.qat.convert` stores.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        config: Optional[QATConfig] = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.config = config if config is not None else QATConfig()
        c = self.config
        self.act_quant = (
            ActFakeQuant(c.a_bits, c.act_granularity, c.symmetric, c.range, c.mask) if c.quantize_acts else None
        )
        if c.method == "lsq":
            shape = (out_features, 1) if c.weight_granularity == "channel" else (1,)
            self.weight_scale = nn.Parameter(torch.ones(shape, device=device, dtype=torch.float32))
        else:
            self.register_parameter("weight_scale", None)
        if c.weight_granularity == "group" and c.weight_dtype == "int" and in_features % c.group_size:
            raise ValueError(f"FakeQuantLinear: group_size {c.group_size} does not divide in_features ({in_features})")

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: QATConfig) -> FakeQuantLinear:
        """A FakeQuantLinear sharing ``linear``'s weight and bias tensors (no copy)."""
        layer = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            config,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )
        layer.weight = linear.weight
        layer.bias = linear.bias
        if layer.weight_scale is not None:
            with torch.no_grad():
                layer.weight_scale.copy_(
                    lsq_init_scale(
                        linear.weight, config.w_bits, config.weight_granularity, "minmax", config.range
                    ).reshape(layer.weight_scale.shape)
                )
        return layer

    def quantized_weight(self) -> torch.Tensor:
        c = self.config
        if c.weight_dtype != "int":
            return fake_quantize_4bit(self.weight, c.weight_dtype, c.group_size)
        if not c.quantize_weights:
            return self.weight
        if c.method == "lsq":
            scale = self.weight_scale.clamp_min(1e-8)
            return fake_quantize_lsq(self.weight, scale, bits=c.w_bits, range=c.range)
        granularity = "channel" if c.weight_granularity == "channel" else c.weight_granularity
        return fake_quantize(
            self.weight, c.w_bits, True, granularity, axis=0, group_size=c.group_size, range=c.range, mask=c.mask
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_quant is not None:
            x = self.act_quant(x)
        return F.linear(x, self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        c = self.config
        w = c.weight_dtype if c.weight_dtype != "int" else f"int{c.w_bits}" if c.quantize_weights else "fp"
        return (
            f"{super().extra_repr()}, weight={w} {c.weight_granularity} ({c.method}), "
            f"input={'int%d %s' % (c.a_bits, c.act_granularity) if c.quantize_acts else 'fp'}"
        )


class QuantizedLinear(nn.Module):
    """Deployable linear layer from :func:`bnbx.qat.convert`: the weight stored quantized, dequantized by
    bnbx's kernels on each forward; inputs quantized per token on the fly when ``a_bits <= 8``.

    Integer weights are stored as int8 codes (``weight_q``, ``[out, in]``) with fp32 scales per output channel,
    per group or per tensor (``weight_scale``), read back with :func:`bnbx.dequantize_int8`. NF4/FP4 weights
    are stored packed (``weight_q``) with fp32 blockwise ``weight_absmax``, read back with
    :func:`bnbx.dequantize_4bit`. Either way the dequantized weight equals the fake-quantized weight of the
    FakeQuantLinear it came from, bit for bit.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        weight_q: torch.Tensor,
        weight_scale: torch.Tensor,
        bias: Optional[torch.Tensor],
        config: QATConfig,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.config, self.dtype = in_features, out_features, config, dtype
        self.register_buffer("weight_q", weight_q)
        self.register_buffer("weight_scale", weight_scale)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        c = config
        self.act_quant = ActFakeQuant(c.a_bits, c.act_granularity, c.symmetric, c.range) if c.quantize_acts else None

    def dequantized_weight(self) -> torch.Tensor:
        c = self.config
        if c.weight_dtype != "int":
            out = torch.empty((self.out_features, self.in_features), dtype=self.dtype, device=self.weight_q.device)
            return dequantize_4bit(
                self.weight_q, absmax=self.weight_scale, out=out, blocksize=c.group_size, quant_type=c.weight_dtype
            )
        granularity = c.weight_granularity
        scale = self.weight_scale
        state = Int8QuantState(
            scale,
            torch.zeros_like(scale, dtype=torch.int32),
            granularity,
            0,
            c.group_size if granularity == "group" else 128,
            True,
            self.dtype,
        )
        return dequantize_int8(self.weight_q, state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_quant is not None:
            x = self.act_quant(x)
        return F.linear(x, self.dequantized_weight(), self.bias)

    def extra_repr(self) -> str:
        c = self.config
        w = c.weight_dtype if c.weight_dtype != "int" else f"int{c.w_bits} in int8"
        return f"in_features={self.in_features}, out_features={self.out_features}, weight={w} {c.weight_granularity}"

    @classmethod
    def from_fake_quant(cls, layer: FakeQuantLinear) -> QuantizedLinear:
        c = layer.config
        w = layer.weight.detach()
        if c.weight_dtype != "int":
            packed, state = quantize_4bit(w, blocksize=c.group_size, quant_type=c.weight_dtype)
            return cls(layer.in_features, layer.out_features, packed, state.absmax, layer.bias, c, w.dtype)
        if not c.quantize_weights:
            raise ValueError("convert: w_bits >= 16 leaves weights in full precision; nothing to convert")
        qmin, qmax = _ops_qat.fake_quant_grid(c.w_bits, c.range == "full")
        if c.method == "lsq":
            scale = layer.weight_scale.detach().clamp_min(1e-8).float()
            if c.weight_granularity == "tensor":
                scale = scale.reshape(())
            else:
                scale = scale.reshape(-1)
        else:
            granularity = c.weight_granularity
            _, scale, _ = fake_quantize(
                w, c.w_bits, True, granularity, axis=0, group_size=c.group_size, range=c.range, return_params=True
            )
        # the codes by the kernel's rule: round(w * (1 / scale)) half to even, clamped (subnormal scales divide)
        if c.weight_granularity == "group":
            s = scale.reshape(w.shape[0], -1, 1)
            groups = w.float().reshape(w.shape[0], -1, c.group_size)
        else:
            s = scale.reshape(-1, 1) if scale.dim() else scale
            groups = w.float()
        inv = torch.where(s == 0, torch.zeros_like(s), 1.0 / s)
        scaled = torch.where(inv.isinf(), groups / s, groups * inv)
        codes = torch.clamp(torch.round(scaled), qmin, qmax).to(torch.int8).reshape(w.shape)
        return cls(layer.in_features, layer.out_features, codes, scale.float().contiguous(), layer.bias, c, w.dtype)
