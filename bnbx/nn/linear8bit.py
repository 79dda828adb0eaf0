"""LLM.int8() linear layer: ``Linear8bitLt`` and its weight ``Int8Params``, bitsandbytes-compatible.

Same constructor, defaults and state_dict keys as bitsandbytes 0.50 (``weight`` int8 ``[N, K]``, ``SCB`` fp32
``[N]`` row absmax, ``weight_format`` uint8 0 = row-major), so a checkpoint saved by either library loads
into the other. Differences, each deliberate:

- the weight is quantized from its own dtype (bitsandbytes casts it to fp16 first, which overflows above
  65504 and rounds bf16/fp32 weights once more); fp16 weights give bitsandbytes' bytes exactly;
- inputs run in their own dtype (bitsandbytes casts activations to fp16), outliers are added in fp32;
- loading a quantized checkpoint into a module that was never moved works (bitsandbytes raises), and loading
  a 16-bit checkpoint into a quantized module quantizes it (bitsandbytes would copy floats into int8);
- the bias is cast per call, never in place.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import functional_int8 as F8
from ..matmul_int8 import matmul_8bit

__all__ = ["Int8Params", "Linear8bitLt"]

# bitsandbytes' LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING: only "row" (0) is stored since 0.45
_WEIGHT_FORMATS = {0: "row", 1: "col32", 2: "col_turing", 3: "col_ampere"}


class Int8Params(nn.Parameter):
    """A weight that becomes int8 row-wise (``CB`` = data, ``SCB`` = row absmax) the first time it moves to a
    (non-meta) device, unless ``has_fp16_weights``; bitsandbytes' ``Int8Params`` signature. Never quantized
    twice: an int8 weight only moves."""

    def __new__(
        cls,
        data: Optional[torch.Tensor] = None,
        requires_grad: bool = True,
        has_fp16_weights: bool = False,
        CB: Optional[torch.Tensor] = None,
        SCB: Optional[torch.Tensor] = None,
        **kwargs,
    ):
        if data is None:
            data = torch.empty(0)
        obj = torch.Tensor._make_subclass(cls, data, requires_grad)
        obj.CB = CB
        obj.SCB = SCB
        obj.has_fp16_weights = has_fp16_weights
        return obj

    @property
    def is_int8(self) -> bool:
        """True once the data holds the int8 codes (not torch.Tensor.is_quantized, which means torch.qint8)."""
        return self.data.dtype == torch.int8

    def _quantize(self, device: Optional[torch.device] = None) -> Int8Params:
        if self.has_fp16_weights:
            return super().to(device)
        weight = self.data.contiguous().to(device)
        if weight.dim() != 2:
            raise ValueError(f"Int8Params: the weight must be 2-D [out_features, in_features], got {weight.dim()}-D")
        CB, SCB, _ = F8.int8_vectorwise_quant(weight)
        self.requires_grad = False
        self.data = CB
        self.CB = CB
        self.SCB = SCB
        return self

    def __deepcopy__(self, memo):
        import copy

        data = copy.deepcopy(self.data, memo)
        clone = type(self)(
            data,
            requires_grad=self.requires_grad,
            has_fp16_weights=self.has_fp16_weights,
            CB=data if self.CB is not None and self.is_int8 else copy.deepcopy(self.CB, memo),
            SCB=copy.deepcopy(self.SCB, memo),
        )
        memo[id(self)] = clone
        return clone

    def __reduce_ex__(self, protocol: int):
        # pickle / torch.save of a whole module: plain tensors plus the settings, rebuilt as an Int8Params (the
        # default would rebuild a plain Parameter and lose SCB)
        return (_rebuild_int8_params, (self.data, self.requires_grad, self.has_fp16_weights, self.SCB))

    def cpu(self):
        return self.to(device="cpu")

    def cuda(self, device=None, non_blocking: bool = False):
        return self.to(device="cuda" if device is None else device, non_blocking=non_blocking)

    def to(self, *args, **kwargs):
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        if not self.is_int8 and device is not None and device.type != "meta" and not self.has_fp16_weights:
            return self._quantize(device)
        if self.is_int8:
            dtype = None  # the codes stay int8 whatever dtype the module is cast to
        moved = super().to(device=device, dtype=dtype, non_blocking=non_blocking)
        new = Int8Params(moved, requires_grad=self.requires_grad, has_fp16_weights=self.has_fp16_weights)
        if self.is_int8:
            new.CB = new.data
            new.SCB = None if self.SCB is None else self.SCB.to(device if device is not None else self.SCB.device)
        return new


def _check_weight_format(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    fmt = state_dict.pop(f"{prefix}weight_format", "row")
    if isinstance(fmt, torch.Tensor):
        fmt = fmt.item()
    if isinstance(fmt, int):
        if fmt not in _WEIGHT_FORMATS:
            raise ValueError(f"Linear8bitLt: unknown weight_format {fmt} in the state_dict")
        fmt = _WEIGHT_FORMATS[fmt]
    if fmt != "row":
        raise ValueError(f"Linear8bitLt: only the 'row' weight_format is supported, got {fmt!r}")


def _rebuild_int8_params(
    data: torch.Tensor, requires_grad: bool, has_fp16_weights: bool, SCB: Optional[torch.Tensor]
) -> Int8Params:
    int8 = data.dtype == torch.int8
    return Int8Params(data, requires_grad, has_fp16_weights, CB=data if int8 else None, SCB=SCB)


class Linear8bitLt(nn.Linear):
    """``nn.Linear`` through LLM.int8(): ``y = x @ W.T + b`` with an int8 weight and per-row int8 activations.

    Args (bitsandbytes' signature and defaults):
        input_features, output_features, bias: as ``nn.Linear``.
        has_fp16_weights: keep and train the 16-bit weight (quantized on the fly each forward); False stores
            int8 (what transformers passes for inference and adapters).
        threshold: activation outlier threshold; input columns holding any ``|x| >= threshold`` run in fp32
            against the dequantized weight columns. 0 disables the decomposition (transformers uses 6.0).
        index: kept for bitsandbytes compatibility; unused.
        device: where to create the weight; a non-meta device other than where it was built quantizes it
            when the module is moved (``.to()``, ``.cpu()``, ``.cuda()``), or at the first forward.

    ``prepack_weight = True`` (off by default): on a CPU with AMX, the first forward with at least 32 input
    rows also keeps the int8 weight in AMX's tile layout (``N x K`` more bytes), so later calls skip packing it
    panel by panel (a few percent at M = 2048, K = 4096, N = 11008). The copy is rebuilt when the weight is
    replaced or changed in place through the parameter (its version counter); after writing into
    ``weight.data`` directly, call :meth:`drop_packed_weight`.
    """

    def __init__(
        self,
        input_features: int,
        output_features: int,
        bias: bool = True,
        has_fp16_weights: bool = True,
        threshold: float = 0.0,
        index=None,
        device=None,
    ):
        super().__init__(input_features, output_features, bias, device)
        self.threshold = F8._check_threshold("Linear8bitLt", threshold)
        self.has_fp16_weights = bool(has_fp16_weights)
        self.index = index
        self.weight = Int8Params(self.weight.data, has_fp16_weights=has_fp16_weights, requires_grad=has_fp16_weights)
        self._register_load_state_dict_pre_hook(_check_weight_format, with_module=False)
        self.prepack_weight = False
        # (weight parameter, its storage (held, so no new weight can reuse the address), (data_ptr, version,
        # shape), packed copy)
        self._packed = None

    def __getstate__(self):
        state = super().__getstate__()
        state = dict(state)
        state["_packed"] = None  # a cache: never pickled or deep-copied
        return state

    def drop_packed_weight(self) -> None:
        """Forget the AMX-layout copy of the weight (rebuilt at the next large-M forward)."""
        self._packed = None

    def _packed_weight(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The cached ``int8_pack_weight(CB)`` where it pays (CPU with AMX, >= 32 rows, eager mode), else None."""
        weight = self.weight
        if (
            not getattr(self, "prepack_weight", False)
            or x.device.type != "cpu"
            or weight.device.type != "cpu"
            or x.numel() < 32 * self.in_features
            or torch.compiler.is_compiling()
            or weight.is_inference()
            or F8.int8_gemm_route() != "amx"
        ):
            return None
        cached = getattr(self, "_packed", None)
        key = (weight.data_ptr(), weight._version, tuple(weight.shape))
        if cached is not None and cached[0] is weight and cached[2] == key:
            return cached[3]
        with torch.no_grad():
            packed = F8.int8_pack_weight(weight.detach())
        self._packed = (weight, weight.untyped_storage(), key, packed)
        return packed

    @classmethod
    def from_linear(cls, linear: nn.Linear, threshold: float = 0.0, has_fp16_weights: bool = False) -> Linear8bitLt:
        """A ``Linear8bitLt`` holding ``linear``'s weight (quantized unless ``has_fp16_weights``) and bias."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"Linear8bitLt.from_linear: expected an nn.Linear, got {type(linear).__name__}")
        device = linear.weight.device
        module = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            has_fp16_weights=has_fp16_weights,
            threshold=threshold,
            device="meta",
        )
        module.weight = Int8Params(
            linear.weight.detach().clone(), requires_grad=has_fp16_weights, has_fp16_weights=has_fp16_weights
        )
        if not has_fp16_weights:
            module.weight._quantize(device)
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        return module

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"threshold={self.threshold}, has_fp16_weights={self.has_fp16_weights}, "
            f"quantized={self.weight.is_int8}"
        )

    def _ensure_quantized(self) -> None:
        if not self.has_fp16_weights and not self.weight.is_int8 and self.weight.device.type != "meta":
            self.weight._quantize(self.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"Linear8bitLt: input must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"Linear8bitLt: input must be float32, float16 or bfloat16, got {x.dtype}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"Linear8bitLt: input must be [..., {self.in_features}], got shape {list(x.shape)}")
        self._ensure_quantized()
        if self.has_fp16_weights:
            return matmul_8bit(x, self.weight, None, self.bias, self.threshold)
        if self.weight.SCB is None:
            raise RuntimeError("Linear8bitLt: the int8 weight has no SCB row statistics; load them with the weight")
        return matmul_8bit(x, self.weight.data, self.weight.SCB, self.bias, self.threshold, self._packed_weight(x))

    # ---- state_dict: bitsandbytes' keys ----------------------------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if not self.has_fp16_weights and self.weight.is_int8 and self.weight.SCB is not None:
            destination[prefix + "SCB"] = self.weight.SCB if keep_vars else self.weight.SCB.detach()
            destination[prefix + "weight_format"] = torch.tensor(0, dtype=torch.uint8)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        weight = state_dict.get(prefix + "weight")
        scb = state_dict.get(prefix + "SCB")
        shape = (self.out_features, self.in_features)
        handled = False  # weight installed here; the generic copy below must not touch it
        if scb is not None:
            if weight is None or weight.dtype != torch.int8 or tuple(weight.shape) != shape:
                raise ValueError(
                    f"Linear8bitLt: {prefix}SCB needs an int8 {prefix}weight of shape {list(shape)}, got "
                    f"{None if weight is None else (weight.dtype, list(weight.shape))}"
                )
            if scb.dtype != torch.float32 or scb.numel() != self.out_features:
                raise ValueError(
                    f"Linear8bitLt: {prefix}SCB must be float32 with {self.out_features} values (one per weight "
                    f"row), got {scb.dtype} with {scb.numel()}"
                )
            if self.has_fp16_weights:
                raise ValueError("Linear8bitLt: an int8 checkpoint (weight + SCB) needs has_fp16_weights=False")
            device = self.weight.device if self.weight.device.type != "meta" else weight.device
            self.weight = Int8Params(
                weight.detach().to(device).clone(),
                requires_grad=False,
                has_fp16_weights=False,
                CB=None,
                SCB=scb.detach().to(device).clone(),
            )
            self.weight.CB = self.weight.data
            handled = True
        elif weight is not None and weight.dtype == torch.int8:
            raise ValueError(f"Linear8bitLt: the int8 {prefix}weight comes without its {prefix}SCB row statistics")
        elif weight is not None and self.weight.is_int8:
            # a 16-bit checkpoint into a quantized module: quantize it rather than copy floats into int8
            if tuple(weight.shape) != shape:
                raise ValueError(
                    f"Linear8bitLt: {prefix}weight must have shape {list(shape)}, got {list(weight.shape)}"
                )
            device = self.weight.device
            self.weight = Int8Params(weight.detach().clone(), requires_grad=False, has_fp16_weights=False)
            self.weight._quantize(device)
            handled = True
        if handled:
            state_dict = {k: v for k, v in state_dict.items() if k != prefix + "weight"}
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        for key in (prefix + "SCB",):
            if key in unexpected_keys:
                unexpected_keys.remove(key)
        if handled and prefix + "weight" in missing_keys:
            missing_keys.remove(prefix + "weight")
