"""QATConfig: one description of the quantizers that prepare() trains with and convert() deploys."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

FULL_PRECISION_BITS = 16  # bits >= this mean "not quantized" (LLM-QAT's 16/32)


def _check_config_bits(name: str, bits: int) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not (2 <= bits <= 8 or bits >= FULL_PRECISION_BITS):
        raise ValueError(f"QATConfig: {name} must be from 2 to 8, or >= 16 for full precision, got {bits!r}")


@dataclass
class QATConfig:
    """What to fake-quantize, and how.

    Attributes:
        w_bits, a_bits, kv_bits: bits of weights, linear-layer inputs and the KV cache (2..8; 16 or more keeps
            that part in full precision), as LLM-QAT's W-A-KV (e.g. 4-8-4).
        weight_granularity: ``"channel"`` (one scale per output row), ``"group"`` or ``"tensor"``.
        act_granularity: ``"token"`` (dynamic, one scale per token) or ``"tensor"``.
        kv_granularity: ``"token"`` (one scale per token over all heads) or ``"head"`` (per token and head).
        symmetric: symmetric (absmax) scaling for weights and activations; asymmetric uses a zero point
            (activations only; weights stay symmetric so they convert to int8 storage exactly).
        range: integer grid, ``"restricted"`` +-(2^(b-1)-1) or ``"full"`` [-2^(b-1), 2^(b-1)-1].
        method: ``"minmax"`` (dynamic scales, no learned parameters) or ``"lsq"`` (learned per-channel weight
            scale with the LSQ gradient, initialised from MinMax).
        weight_dtype: ``"int"``, or ``"nf4"`` / ``"fp4"`` (QLoRA storage types, blockwise absmax of
            ``group_size`` elements, default 64).
        group_size: elements per group for ``"group"`` weights, and the 4-bit blocksize.
        mask: straight-through gradient mask of the MinMax quantizers (``"none"``, ``"range"``, ``"absolute"``).
        skip: module names (exact or dotted prefixes) left in full precision, in addition to ``lm_head``
            and embeddings; each must exist in the model.
        modules: if given, only these Linear modules (exact names or prefixes) are prepared; each must exist.
    """

    w_bits: int = 4
    a_bits: int = 8
    kv_bits: int = 16
    weight_granularity: Literal["channel", "group", "tensor"] = "channel"
    act_granularity: Literal["token", "tensor"] = "token"
    kv_granularity: Literal["token", "head"] = "token"
    symmetric: bool = True
    range: Literal["restricted", "full"] = "restricted"
    method: Literal["minmax", "lsq"] = "minmax"
    weight_dtype: Literal["int", "nf4", "fp4"] = "int"
    group_size: Optional[int] = None
    mask: Literal["none", "range", "absolute"] = "none"
    skip: tuple[str, ...] = field(default_factory=tuple)
    modules: Optional[tuple[str, ...]] = None

    def __post_init__(self) -> None:
        for name in ("w_bits", "a_bits", "kv_bits"):
            _check_config_bits(name, getattr(self, name))
        choices = {
            "weight_granularity": ("channel", "group", "tensor"),
            "act_granularity": ("token", "tensor"),
            "kv_granularity": ("token", "head"),
            "range": ("restricted", "full"),
            "method": ("minmax", "lsq"),
            "weight_dtype": ("int", "nf4", "fp4"),
            "mask": ("none", "range", "absolute"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"QATConfig: {name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.weight_dtype != "int" and self.method != "minmax":
            raise ValueError("QATConfig: weight_dtype 'nf4'/'fp4' uses blockwise absmax; method must be 'minmax'")
        if self.method == "lsq" and self.weight_granularity == "group":
            raise ValueError("QATConfig: method 'lsq' learns per-channel or per-tensor scales, not per group")
        if self.group_size is None:
            self.group_size = 64 if self.weight_dtype != "int" else 128
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"QATConfig: group_size must be a positive integer, got {self.group_size!r}")
        self.skip = tuple(self.skip)
        if self.modules is not None:
            self.modules = tuple(self.modules)

    @property
    def quantize_weights(self) -> bool:
        return self.weight_dtype != "int" or self.w_bits < FULL_PRECISION_BITS

    @property
    def quantize_acts(self) -> bool:
        return self.a_bits < FULL_PRECISION_BITS

    @property
    def quantize_kv(self) -> bool:
        return self.kv_bits < FULL_PRECISION_BITS
