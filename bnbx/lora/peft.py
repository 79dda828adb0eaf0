"""peft interop: a LoRA layer for bnbx's quantized linear layers, registered through peft's custom-module
mapping (``LoraConfig._register_custom_module``).

The mapping is not saved with an adapter, so ``import bnbx`` registers it on every ``LoraConfig`` peft
creates, including the one ``PeftModel.from_pretrained`` reads from ``adapter_config.json``. Without it,
peft would give bnbx layers (``nn.Linear`` subclasses) its generic ``lora.Linear``, whose merge adds the
delta to the packed bytes.

Merging never touches the packed base: ``merge()`` keeps a dense merged weight beside it (``unmerge()`` is
exact), and peft's ``merge_and_unload()`` turns each layer into a dense ``nn.Linear`` in the base's compute
dtype, summed in fp32 and rounded once. (peft over bitsandbytes re-quantizes instead: a 4-bit model whose
weights were rounded twice.)

Forward runs bnbx.lora's fused adapter op (``torch.ops.bnbx.lora_forward``) for each active adapter, as
``LoraLinear`` does; peft's own forward takes the cases it does not cover (``adapter_names`` mixed batches,
a ``lora_B`` bias, other dtypes).

This module imports peft; ``import bnbx`` does not (the registration waits for peft to be imported).
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as _PeftLinear
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from ._base import FUSED_DTYPES, adapter_input, base_compute_dtype, base_weight_dtype, dense_weight, is_quantized_layer

__all__ = ["PeftLoraLinear", "peft_delta_weight", "quantized_layer_classes", "register"]


def quantized_layer_classes() -> tuple[type, ...]:
    """bnbx's quantized linear layer classes present in this build (``Linear4bit``, ``Linear8bitLt``)."""
    try:
        from .. import nn as bnbx_nn
    except ImportError:
        return ()
    return tuple(cls for cls in (getattr(bnbx_nn, "Linear4bit", None), getattr(bnbx_nn, "Linear8bitLt", None)) if cls)


class PeftLoraLinear(_PeftLinear):
    """peft's ``lora.Linear`` over a bnbx quantized base layer, with exact, single-rounding merges.

    Only plain LoRA (and rsLoRA) is supported; DoRA and the other variants raise ``ValueError``.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: Any, r: int = 0, lora_alpha: int = 1,
                 **kwargs: Any) -> None:
        if getattr(config, "fan_in_fan_out", False):
            raise ValueError("bnbx LoRA: fan_in_fan_out=True does not apply to bnbx linear layers; set it to False")
        super().__init__(base_layer, adapter_name, config=config, r=r, lora_alpha=lora_alpha, **kwargs)
        self.merged_weight: Optional[torch.Tensor]
        self.merged_bias: Optional[torch.Tensor]
        self.register_buffer("merged_weight", None, persistent=False)
        self.register_buffer("merged_bias", None, persistent=False)

    def resolve_lora_variant(self, *, config: Any, **kwargs: Any):
        variant = super().resolve_lora_variant(config=config, **kwargs)
        if variant is not None:
            raise ValueError(
                f"bnbx LoRA: {type(variant).__name__} (DoRA, aLoRA, ...) is not supported on bnbx quantized "
                "layers; use plain LoRA"
            )
        return None

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Optional[torch.device] = None) -> None:
        # the device only: the packed weight's storage dtype (uint8, or bf16 for FSDP) says nothing about the
        # dtype to train the adapter in
        if device is None:
            device = self.get_base_layer().weight.device
        if device.type == "meta":
            return
        for name in self.adapter_layer_names:
            layers = getattr(self, name, None)
            if isinstance(layers, (nn.ModuleDict, nn.ParameterDict)) and adapter_name in layers:
                if not any(p.device.type == "meta" for p in layers[adapter_name].parameters()):
                    layers[adapter_name] = layers[adapter_name].to(device)

    def _merged_tensors(self, adapters: list[str]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        base = self.get_base_layer()
        weight = dense_weight(base, torch.float32)
        bias = None if getattr(base, "bias", None) is None else base.bias.detach().float()
        for adapter in adapters:
            weight = weight + _delta(self, adapter)
            extra = getattr(self.lora_B[adapter], "bias", None)
            if extra is not None:
                add = extra.detach().float() * self.scaling[adapter]
                bias = add if bias is None else bias + add
        return weight, bias

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Merge adapters into a dense weight beside the untouched packed base (see the module docstring)."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        adapters = list(self.merged_adapters) + [a for a in adapter_names if a in self.lora_A]
        if len(adapters) == len(self.merged_adapters):
            return
        dtype = base_compute_dtype(self.get_base_layer())
        with torch.no_grad():
            weight, bias = self._merged_tensors(adapters)
            weight = weight.to(dtype)
        if safe_merge and not bool(torch.isfinite(weight).all()):
            raise ValueError(f"NaNs detected in the merged weights. The adapter(s) {adapters} seem to be broken")
        self.merged_weight = weight
        self.merged_bias = None if bias is None else bias.to(dtype)
        self.merged_adapters[:] = adapters

    def unmerge(self) -> None:
        """Drop the merged weight; the base was never modified, so this is exact."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        self.merged_weight = None
        self.merged_bias = None
        self.merged_adapters.clear()

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.merged and not self.disable_adapters and kwargs.get("adapter_names") is None \
                and self.merged_weight is not None:
            weight = self.merged_weight
            out = F.linear(x.to(weight.dtype), weight, self.merged_bias)
            return out.to(x.dtype)
        if args or kwargs or self.disable_adapters or self.merged or not self._fused_adapters(x):
            return super().forward(x, *args, **kwargs)
        # bnbx.lora's fused op per active adapter (LoraLinear.forward): the adapter's products in fp32 on x as it
        # is, added to the output before its one rounding, instead of peft's casts, three GEMMs and adds
        result = self.base_layer(x)
        for adapter in self.active_adapters:
            if adapter not in self.lora_A:
                continue
            lora_A, lora_B = self.lora_A[adapter].weight, self.lora_B[adapter].weight
            inputs = adapter_input(x, self.lora_dropout[adapter], lora_A.dtype)
            result = torch.ops.bnbx.lora_forward(inputs, result, lora_A, lora_B, self.scaling[adapter])
        return result

    def _fused_adapters(self, x: torch.Tensor) -> bool:
        """Whether the fused op computes every active adapter: dtypes it takes, no lora_B bias."""
        if x.dtype not in FUSED_DTYPES:
            return False
        for adapter in self.active_adapters:
            if adapter not in self.lora_A:
                continue
            if self.lora_B[adapter].bias is not None or self.lora_A[adapter].weight.dtype not in FUSED_DTYPES:
                return False
        return True

    def unload_and_optionally_merge_module(self, merge: bool, safe_merge: bool,
                                           adapter_names: Optional[list[str]]) -> nn.Module:
        """peft's ``merge_and_unload``/``unload`` hook: when merging, a dense ``nn.Linear`` in the dtype the
        weight had before quantization (rounded once); otherwise the untouched quantized base."""
        base = self.get_base_layer()
        if not merge:
            return base
        pending = check_adapters_to_merge(self, adapter_names)
        adapters = list(self.merged_adapters) + [a for a in pending if a in self.lora_A]
        dtype = base_weight_dtype(base)
        with torch.no_grad():
            weight, bias = self._merged_tensors(adapters)
        if safe_merge and not bool(torch.isfinite(weight).all()):
            raise ValueError(f"NaNs detected in the merged weights. The adapter(s) {adapters} seem to be broken")
        linear = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device=weight.device,
                           dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if bias is not None:
                linear.bias.copy_(bias)
        return linear.requires_grad_(False)

    def __repr__(self) -> str:
        return "bnbx." + super().__repr__()


def _delta(layer: nn.Module, adapter: str) -> torch.Tensor:
    if adapter in getattr(layer, "lora_variant", {}):
        raise ValueError(f"bnbx: adapter {adapter!r} is a LoRA variant (e.g. DoRA); only plain LoRA can be merged here")
    delta = layer.lora_B[adapter].weight.detach().float() @ layer.lora_A[adapter].weight.detach().float()
    if getattr(layer, "fan_in_fan_out", False):
        delta = delta.T
    return delta * layer.scaling[adapter]


def peft_delta_weight(layer: nn.Module) -> torch.Tensor:
    """The fp32 delta that a peft LoRA layer adds on top of its base layer's current weight: every active
    adapter for bnbx's layer (its base is never modified); for peft's own layers, those not yet merged into
    the base weight."""
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if isinstance(layer, PeftLoraLinear):
        adapters = list(dict.fromkeys(list(layer.merged_adapters) + active))
    else:
        adapters = [a for a in active if a not in layer.merged_adapters]
        if is_quantized_layer(layer.get_base_layer()) and layer.merged_adapters:
            raise ValueError("merge_and_unload: a peft layer merged adapters into a quantized base; unmerge first")
    delta = torch.zeros((), dtype=torch.float32)  # broadcasts: no pending adapter adds nothing
    for adapter in adapters:
        delta = delta + _delta(layer, adapter)
    return delta


def register(config: Any) -> Any:
    """Map bnbx's quantized layers to :class:`PeftLoraLinear` on a peft ``LoraConfig`` (what ``import bnbx``
    does for every new config). A mapping the user registered for the same class is kept. Returns ``config``."""
    current = getattr(config, "_custom_modules", None) or {}
    mapping = {cls: PeftLoraLinear for cls in quantized_layer_classes() if cls not in current}
    if mapping:
        config._register_custom_module(mapping)
    return config
