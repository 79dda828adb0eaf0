"""``Linear4bit``: a linear layer whose weight is stored as packed NF4/FP4 codes (QLoRA's frozen base layer).

Mirrors bitsandbytes' ``bitsandbytes.nn.Linear4bit`` and ``Params4bit``: the same constructor, attribute
names, state_dict keys and bytes, so transformers, peft and bitsandbytes checkpoints work unchanged.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Optional

import torch
from torch import nn

from .. import _checks, _formats, _ops
from ..functional import dequantize_4bit, quantize_4bit
from ..matmul import matmul_4bit
from ..quant_state import QuantState

__all__ = ["Linear4bit", "LinearFP4", "LinearNF4", "Params4bit"]

logger = logging.getLogger(__name__)


def _cast_error(dtype: Any) -> TypeError:
    return TypeError(
        f"Params4bit: cannot cast a packed 4-bit weight to {dtype}: its storage holds 4-bit codes, not values. "
        "Use Linear4bit.dequantize() (or bnbx.dequantize_4bit(weight, weight.quant_state)) for a dense weight."
    )


class Params4bit(nn.Parameter):
    """A weight that holds float values until it is moved to a device, then packed 4-bit codes for good.

    Quantization happens once, on the first ``.to(device)`` / ``.cpu()`` / ``.cuda()`` (or when a float weight
    is loaded into a :class:`Linear4bit`); later moves carry the packed bytes and ``quant_state`` unchanged.
    A quantized weight refuses casts to another float dtype (``TypeError``), since that would reinterpret
    codes as values. The name is bitsandbytes' (peft looks for the class name ``Params4bit``).

    Attributes:
        quant_state: the :class:`~bnbx.QuantState` once quantized, else ``None``.
        blocksize, compress_statistics, quant_type, quant_storage: how to quantize (bitsandbytes' names).
        bnb_quantized: whether ``data`` holds packed codes.
    """

    def __new__(
        cls,
        data: Optional[torch.Tensor] = None,
        requires_grad: bool = False,
        quant_state: Optional[QuantState] = None,
        blocksize: Optional[int] = None,
        compress_statistics: bool = True,
        quant_type: str = "fp4",
        quant_storage: torch.dtype = torch.uint8,
        module: Optional["Linear4bit"] = None,
        bnb_quantized: bool = False,
        **kwargs: Any,
    ) -> "Params4bit":
        if data is None:
            data = torch.empty(0)
        blocksize = 64 if blocksize is None else blocksize
        _checks.check_blocksize("Params4bit", blocksize)
        _checks.check_quant_type("Params4bit", quant_type)
        _checks.check_quant_storage("Params4bit", quant_storage)
        self = torch.Tensor._make_subclass(cls, data, requires_grad)
        self.blocksize = blocksize
        self.compress_statistics = compress_statistics
        self.quant_type = quant_type
        self.quant_state = quant_state
        self.quant_storage = quant_storage
        self.bnb_quantized = bnb_quantized
        self.module = module
        return self

    def _quantize(self, device: torch.device | str | None) -> "Params4bit":
        weight = self.data.contiguous()
        if device is not None:
            weight = weight.to(device)
        packed, state = quantize_4bit(
            weight,
            blocksize=self.blocksize,
            quant_type=self.quant_type,
            compress_statistics=self.compress_statistics,
            quant_storage=self.quant_storage,
        )
        self.data = packed
        self.quant_state = state
        self.bnb_quantized = True
        if self.module is not None:
            self.module.quant_state = state
        return self

    def _same_attributes(self, data: torch.Tensor) -> "Params4bit":
        return Params4bit(
            data,
            requires_grad=self.requires_grad,
            quant_state=self.quant_state,
            blocksize=self.blocksize,
            compress_statistics=self.compress_statistics,
            quant_type=self.quant_type,
            quant_storage=self.quant_storage,
            module=self.module,
            bnb_quantized=self.bnb_quantized,
        )

    def to(self, *args: Any, **kwargs: Any) -> "Params4bit":  # type: ignore[override]
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        if not self.bnb_quantized:
            if device is not None and device.type != "meta":
                if dtype is not None:
                    self.data = self.data.to(dtype)
                return self._quantize(device)
            return self._same_attributes(super().to(device=device, dtype=dtype, non_blocking=non_blocking))
        if dtype is not None and dtype != self.dtype:
            raise _cast_error(dtype)
        if self.quant_state is not None and device is not None:
            self.quant_state.to(device)
        return self._same_attributes(super().to(device=device, non_blocking=non_blocking))

    def cpu(self) -> "Params4bit":  # type: ignore[override]
        return self.to(device="cpu")

    def cuda(self, device: Optional[int | torch.device | str] = None, non_blocking: bool = False) -> "Params4bit":  # type: ignore[override]
        return self.to(device="cuda" if device is None else device, non_blocking=non_blocking)

    def _refuse_cast(self, dtype: torch.dtype) -> "Params4bit":
        if self.bnb_quantized and dtype != self.dtype:
            raise _cast_error(dtype)
        return self._same_attributes(super().to(dtype=dtype))

    def half(self, *args: Any, **kwargs: Any) -> "Params4bit":  # type: ignore[override]
        return self._refuse_cast(torch.float16)

    def bfloat16(self, *args: Any, **kwargs: Any) -> "Params4bit":  # type: ignore[override]
        return self._refuse_cast(torch.bfloat16)

    def float(self, *args: Any, **kwargs: Any) -> "Params4bit":  # type: ignore[override]
        return self._refuse_cast(torch.float32)

    def double(self, *args: Any, **kwargs: Any) -> "Params4bit":  # type: ignore[override]
        return self._refuse_cast(torch.float64)

    def __deepcopy__(self, memo: dict) -> "Params4bit":
        clone = Params4bit(
            self.data.clone(memory_format=torch.preserve_format),
            requires_grad=self.requires_grad,
            quant_state=copy.deepcopy(self.quant_state, memo),
            blocksize=self.blocksize,
            compress_statistics=self.compress_statistics,
            quant_type=self.quant_type,
            quant_storage=self.quant_storage,
            bnb_quantized=self.bnb_quantized,
        )
        memo[id(self)] = clone
        return clone

    def __reduce_ex__(self, protocol: int):
        # Pickle as plain data plus the settings; never pickles the module back-reference.
        return (
            _rebuild_params4bit,
            (self.data, self.requires_grad, self.quant_state, self.blocksize, self.compress_statistics,
             self.quant_type, self.quant_storage, self.bnb_quantized),
        )

    # bitsandbytes exposes the state's tensors as attributes of the weight, which FSDP's state_dict traversal
    # resolves for keys like "weight.absmax".
    @property
    def absmax(self) -> torch.Tensor:
        return self._state("absmax").absmax

    @property
    def quant_map(self) -> torch.Tensor:
        return self._state("quant_map").code

    @property
    def nested_absmax(self) -> torch.Tensor:
        return self._nested("nested_absmax").absmax

    @property
    def nested_quant_map(self) -> torch.Tensor:
        return self._nested("nested_quant_map").code

    def _state(self, name: str) -> QuantState:
        state = self.__dict__.get("quant_state")
        if state is None:
            raise AttributeError(f"'Params4bit' object has no attribute '{name}' (not quantized yet)")
        return state

    def _nested(self, name: str) -> QuantState:
        state2 = self._state(name).state2
        if state2 is None:
            raise AttributeError(f"'Params4bit' object has no attribute '{name}' (no double quantization)")
        return state2


def _rebuild_params4bit(data, requires_grad, quant_state, blocksize, compress_statistics, quant_type,
                        quant_storage, bnb_quantized) -> Params4bit:
    return Params4bit(data, requires_grad, quant_state, blocksize, compress_statistics, quant_type, quant_storage,
                      bnb_quantized=bnb_quantized)


class Linear4bit(nn.Linear):
    """``y = x W^T + b`` with ``W`` stored as packed 4-bit NF4/FP4 codes (bitsandbytes' ``Linear4bit``).

    The weight is quantized when the module is moved to a device (``.to("cpu")``, ``.cuda()``), when a float
    state_dict is loaded, or at the first forward, whichever comes first; a state_dict saved by bitsandbytes'
    or bnbx's ``Linear4bit`` loads its packed bytes as they are. Use :meth:`from_linear` to convert an
    ``nn.Linear``.

    Args:
        input_features, output_features, bias: as ``nn.Linear``.
        compute_dtype: the dtype the product is computed in (the input is cast to it and the result cast back);
            ``None`` computes in the input's dtype.
        compress_statistics: double quantization of the per-block absmax (about 0.37 bits per parameter fewer).
        quant_type: ``"fp4"`` (bitsandbytes' default) or ``"nf4"`` (QLoRA's choice for normally distributed
            weights).
        quant_storage: dtype the packed bytes are viewed as (``torch.bfloat16`` for FSDP sharding).
        device: where the (float) weight is first allocated; ``"meta"`` allocates nothing.
        blocksize: elements per absmax block (bnbx extension; 64 as bitsandbytes).
    """

    def __init__(
        self,
        input_features: int,
        output_features: int,
        bias: bool = True,
        compute_dtype: Optional[torch.dtype] = None,
        compress_statistics: bool = True,
        quant_type: str = "fp4",
        quant_storage: torch.dtype = torch.uint8,
        device: Optional[torch.device | str] = None,
        blocksize: int = 64,
    ) -> None:
        if compute_dtype is not None and compute_dtype not in _formats.SUPPORTED_FLOATS:
            raise TypeError(
                f"Linear4bit: compute_dtype must be None, float32, float16 or bfloat16, got {compute_dtype}"
            )
        super().__init__(input_features, output_features, bias, device)
        self.weight = Params4bit(
            self.weight.data,
            requires_grad=False,
            blocksize=blocksize,
            compress_statistics=compress_statistics,
            quant_type=quant_type,
            quant_storage=quant_storage,
            module=self,
        )
        self.compute_dtype = compute_dtype
        self.quant_state: Optional[QuantState] = None

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        compute_dtype: Optional[torch.dtype] = None,
        compress_statistics: bool = True,
        quant_type: str = "nf4",
        quant_storage: torch.dtype = torch.uint8,
        blocksize: int = 64,
    ) -> "Linear4bit":
        """A quantized copy of ``linear`` on its device (NF4 by default here, QLoRA's format); the bias is
        copied unchanged. ``linear`` is not modified."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"Linear4bit.from_linear: expected an nn.Linear, got {type(linear).__name__}")
        weight = linear.weight.detach()
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, compute_dtype,
                     compress_statistics, quant_type, quant_storage, device="meta", blocksize=blocksize)
        module.weight = Params4bit(weight.clone(), False, None, blocksize, compress_statistics, quant_type,
                                   quant_storage, module=module)
        module.weight._quantize(weight.device)
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        return module

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The dense ``[out_features, in_features]`` weight (the original dtype unless ``dtype`` is given)."""
        weight = self.weight
        if not weight.bnb_quantized:
            return weight.data.to(dtype or weight.dtype)
        dense = dequantize_4bit(weight.data, weight.quant_state)
        return dense if dtype is None else dense.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"Linear4bit: input must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"Linear4bit: input's last dimension must equal in_features ({self.in_features}), "
                f"got input of shape {list(x.shape)}"
            )
        weight = self.weight
        if isinstance(weight, Params4bit) and not weight.bnb_quantized:
            logger.info("Linear4bit: quantizing the weight at the first forward")
            weight._quantize(weight.device)
        # FSDP2 (fully_shard) swaps the weight for a plain Parameter holding the all-gathered packed bytes, so
        # the quant_state comes from the module when the weight has none
        state = getattr(weight, "quant_state", None) or self.quant_state
        if state is None:
            raise RuntimeError("Linear4bit: the weight is not quantized and has no quant_state")
        input_dtype = x.dtype
        if self.compute_dtype is not None:
            x = x.to(self.compute_dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return matmul_4bit(x, weight.t(), state, bias=bias).to(input_dtype)

    # --- state_dict: bitsandbytes' keys and bytes ------------------------------------------------------------

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        state = self.weight.quant_state
        if self.weight.bnb_quantized and state is not None:
            for key, value in state.as_dict(packed=True).items():
                destination[prefix + "weight." + key] = value if keep_vars else value.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        key = prefix + "weight"
        stats = {k: v for k, v in state_dict.items() if k.startswith(key + ".")}
        rest = {k: v for k, v in state_dict.items() if k != key and k not in stats}
        loaded = key in state_dict
        if loaded:
            if stats:
                self._load_packed(state_dict[key], {k[len(key) + 1:]: v for k, v in stats.items()})
            else:
                self._load_dense(state_dict[key])
        else:
            unexpected_keys.extend(stats)
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if loaded and key in missing_keys:
            missing_keys.remove(key)

    def _load_packed(self, packed: torch.Tensor, stats: dict[str, Any]) -> None:
        state = QuantState.from_dict(stats, device=packed.device)
        expected = (self.out_features, self.in_features)
        if tuple(state.shape) != expected:
            raise ValueError(
                f"Linear4bit: the state_dict's quant_state describes a weight of shape {list(state.shape)}, "
                f"but this layer's weight is {list(expected)} (out_features, in_features)"
            )
        if not isinstance(packed, torch.Tensor) or packed.dtype not in _formats.QUANT_STORAGES:
            raise ValueError("Linear4bit: the state_dict's weight must be a packed uint8/int8/float tensor")
        stored = packed.numel() * packed.element_size()
        needed = _ops.packed_4bit_bytes(state.numel, packed.element_size())
        if stored != needed:
            raise ValueError(
                f"Linear4bit: the state_dict's weight holds {stored} bytes of packed codes, but its quant_state "
                f"(shape {list(state.shape)}) needs {needed}"
            )
        target = self.weight.device if self.weight.device.type != "meta" else packed.device
        state.to(target)
        self.weight = Params4bit(
            packed.detach().to(target).reshape(-1, 1).clone(),
            requires_grad=False,
            quant_state=state,
            blocksize=state.blocksize,
            compress_statistics=state.nested,
            quant_type=state.quant_type,
            quant_storage=packed.dtype,
            module=self,
            bnb_quantized=True,
        )
        self.quant_state = state

    def _load_dense(self, weight: torch.Tensor) -> None:
        expected = (self.out_features, self.in_features)
        if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != expected:
            shape = list(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
            raise ValueError(f"Linear4bit: the state_dict's weight has shape {shape}, expected {list(expected)} "
                             "(a float weight), or packed codes with their quant_state keys")
        if weight.dtype not in _formats.SUPPORTED_FLOATS:
            raise TypeError(f"Linear4bit: a dense weight must be float32, float16 or bfloat16, got {weight.dtype}")
        old = self.weight
        target = old.device if old.device.type != "meta" else weight.device
        self.weight = Params4bit(weight.detach().clone(), False, None, old.blocksize, old.compress_statistics,
                                 old.quant_type, old.quant_storage, module=self)
        if target.type != "meta":
            self.weight._quantize(target)

    def extra_repr(self) -> str:
        w = self.weight
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"quant_type={w.quant_type}, blocksize={w.blocksize}, compress_statistics={w.compress_statistics}, "
            f"compute_dtype={self.compute_dtype}, quant_storage={w.quant_storage}, quantized={w.bnb_quantized}"
        )


class LinearFP4(Linear4bit):
    """:class:`Linear4bit` with ``quant_type="fp4"``."""

    def __init__(self, input_features: int, output_features: int, bias: bool = True,
                 compute_dtype: Optional[torch.dtype] = None, compress_statistics: bool = True,
                 quant_storage: torch.dtype = torch.uint8, device: Optional[torch.device | str] = None,
                 blocksize: int = 64) -> None:
        super().__init__(input_features, output_features, bias, compute_dtype, compress_statistics, "fp4",
                         quant_storage, device, blocksize)


class LinearNF4(Linear4bit):
    """:class:`Linear4bit` with ``quant_type="nf4"``."""

    def __init__(self, input_features: int, output_features: int, bias: bool = True,
                 compute_dtype: Optional[torch.dtype] = None, compress_statistics: bool = True,
                 quant_storage: torch.dtype = torch.uint8, device: Optional[torch.device | str] = None,
                 blocksize: int = 64) -> None:
        super().__init__(input_features, output_features, bias, compute_dtype, compress_statistics, "nf4",
                         quant_storage, device, blocksize)
