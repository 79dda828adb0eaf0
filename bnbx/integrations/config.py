"""``BnbxConfig``: what to quantize and how, with ``BitsAndBytesConfig``'s field names and defaults.

When transformers is installed it is a ``QuantizationConfigMixin`` registered under ``quant_method="bnbx"``
(see :mod:`bnbx.integrations.transformers`), so ``from_pretrained(..., quantization_config=BnbxConfig(...))``
works; without transformers it is a plain object for :func:`bnbx.quantize_model_`.

Serialised form (``config.json``): ``quant_method: "bnbx"``, ``bits`` (4 or 8) and ``weight_only`` instead
of ``load_in_4bit`` / ``load_in_8bit``, because transformers sends every quantization config with a true
``load_in_4bit``/``load_in_8bit`` to bitsandbytes whatever its ``quant_method``; all other fields keep their
names, dtypes as strings.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from typing import Any, Optional

import torch

from .. import _formats

if importlib.util.find_spec("transformers") is not None:
    from transformers.utils.quantization_config import QuantizationConfigMixin as _Base
else:  # no transformers: a plain object
    _Base = object

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_STORAGES = {
    "uint8": torch.uint8,
    "int8": torch.int8,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}
WEIGHT_ONLY = ("absmax8", "zeropoint8", "blockwise8")


def _dtype(name: str, value: Any, table: dict[str, torch.dtype]) -> Optional[torch.dtype]:
    """A dtype from a dtype or its name (looked up in a fixed table, never getattr(torch, ...))."""
    if value is None or isinstance(value, torch.dtype):
        if value is not None and value not in table.values():
            raise ValueError(f"BnbxConfig: {name} must be one of {', '.join(table)}, got {value}")
        return value
    if isinstance(value, str):
        key = value.removeprefix("torch.")
        if key in table:
            return table[key]
    raise ValueError(f"BnbxConfig: {name} must be one of {', '.join(table)} (or None), got {value!r}")


def _dtype_name(dtype: Optional[torch.dtype]) -> Optional[str]:
    return None if dtype is None else str(dtype).removeprefix("torch.")


class BnbxConfig(_Base):
    """How to quantize a model's linear layers with bnbx.

    Args (``BitsAndBytesConfig``'s names and defaults):
        load_in_8bit: LLM.int8() (``Linear8bitLt``) layers.
        load_in_4bit: 4-bit (``Linear4bit``) layers.
        llm_int8_threshold: outlier threshold on activations for LLM.int8() (0 = pure int8).
        llm_int8_skip_modules: modules to leave unquantized; None = ``lm_head``, tied weights and the last
            module (transformers' default), plus ``_keep_in_fp32_modules``.
        llm_int8_enable_fp32_cpu_offload, llm_int8_has_fp16_weight: as in bitsandbytes.
        bnb_4bit_compute_dtype: dtype of the 4-bit matmul (None = float32, bitsandbytes' default).
        bnb_4bit_quant_type: ``"fp4"`` (default) or ``"nf4"``.
        bnb_4bit_use_double_quant: quantize the per-block absmax again (about 0.37 bit/weight less).
        bnb_4bit_quant_storage: dtype of the packed 4-bit storage (None = uint8).
    bnbx's own:
        blocksize: elements per absmax block (4-bit: 64; blockwise8: 256 when left at None).
        weight_only: ``"absmax8"``, ``"zeropoint8"`` or ``"blockwise8"``: weight-only 8-bit layers instead.
    """

    def __init__(
        self,
        load_in_8bit: bool = False,
        load_in_4bit: bool = False,
        llm_int8_threshold: float = 6.0,
        llm_int8_skip_modules: Optional[list[str]] = None,
        llm_int8_enable_fp32_cpu_offload: bool = False,
        llm_int8_has_fp16_weight: bool = False,
        bnb_4bit_compute_dtype: Any = None,
        bnb_4bit_quant_type: str = "fp4",
        bnb_4bit_use_double_quant: bool = False,
        bnb_4bit_quant_storage: Any = None,
        blocksize: Optional[int] = None,
        weight_only: Optional[str] = None,
        bits: Optional[int] = None,
        **kwargs: Any,
    ) -> None:
        self.quant_method = "bnbx"
        kwargs.pop("quant_method", None)
        if kwargs:  # as BitsAndBytesConfig: unknown keys are ignored (a newer bnbx may write more)
            import logging

            logging.getLogger("bnbx").info("BnbxConfig: ignoring unknown keys %s", sorted(kwargs))
        for name, value in (
            ("load_in_8bit", load_in_8bit),
            ("load_in_4bit", load_in_4bit),
            ("llm_int8_enable_fp32_cpu_offload", llm_int8_enable_fp32_cpu_offload),
            ("llm_int8_has_fp16_weight", llm_int8_has_fp16_weight),
            ("bnb_4bit_use_double_quant", bnb_4bit_use_double_quant),
        ):
            if not isinstance(value, bool):
                raise TypeError(f"BnbxConfig: {name} must be a bool, got {value!r}")
        if bits is not None:
            if bits not in (4, 8):
                raise ValueError(f"BnbxConfig: bits must be 4 or 8, got {bits!r}")
            load_in_4bit, load_in_8bit = bits == 4, bits == 8
        if weight_only is not None:
            if weight_only not in WEIGHT_ONLY:
                raise ValueError(
                    f"BnbxConfig: weight_only must be one of {', '.join(WEIGHT_ONLY)}, got {weight_only!r}"
                )
            load_in_4bit, load_in_8bit = False, True
        if load_in_4bit and load_in_8bit:
            raise ValueError("BnbxConfig: load_in_4bit and load_in_8bit are both True; choose one")
        if not (load_in_4bit or load_in_8bit):
            raise ValueError("BnbxConfig: set load_in_4bit=True or load_in_8bit=True (or weight_only=...)")
        if (
            not isinstance(llm_int8_threshold, (int, float))
            or isinstance(llm_int8_threshold, bool)
            or llm_int8_threshold < 0
        ):
            raise ValueError(f"BnbxConfig: llm_int8_threshold must be a number >= 0, got {llm_int8_threshold!r}")
        if llm_int8_skip_modules is not None and (
            not isinstance(llm_int8_skip_modules, (list, tuple))
            or not all(isinstance(name, str) for name in llm_int8_skip_modules)
        ):
            raise TypeError(f"BnbxConfig: llm_int8_skip_modules must be a list of names, got {llm_int8_skip_modules!r}")
        if bnb_4bit_quant_type not in ("fp4", "nf4"):
            raise ValueError(f"BnbxConfig: bnb_4bit_quant_type must be 'fp4' or 'nf4', got {bnb_4bit_quant_type!r}")
        if blocksize is None:
            blocksize = 256 if weight_only == "blockwise8" else 64
        if blocksize not in _formats.BLOCKSIZES:
            raise ValueError(f"BnbxConfig: blocksize must be one of {list(_formats.BLOCKSIZES)}, got {blocksize!r}")
        self._load_in_4bit = load_in_4bit
        self._load_in_8bit = load_in_8bit
        self.llm_int8_threshold = float(llm_int8_threshold)
        self.llm_int8_skip_modules = None if llm_int8_skip_modules is None else list(llm_int8_skip_modules)
        self.llm_int8_enable_fp32_cpu_offload = llm_int8_enable_fp32_cpu_offload
        self.llm_int8_has_fp16_weight = llm_int8_has_fp16_weight
        self.bnb_4bit_compute_dtype = _dtype("bnb_4bit_compute_dtype", bnb_4bit_compute_dtype, _DTYPES) or torch.float32
        self.bnb_4bit_quant_type = bnb_4bit_quant_type
        self.bnb_4bit_use_double_quant = bnb_4bit_use_double_quant
        self.bnb_4bit_quant_storage = _dtype("bnb_4bit_quant_storage", bnb_4bit_quant_storage, _STORAGES) or torch.uint8
        self.blocksize = int(blocksize)
        self.weight_only = weight_only

    # load_in_4bit / load_in_8bit as properties (as BitsAndBytesConfig): kept exclusive
    @property
    def load_in_4bit(self) -> bool:
        return self._load_in_4bit

    @load_in_4bit.setter
    def load_in_4bit(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"BnbxConfig: load_in_4bit must be a bool, got {value!r}")
        if value and self.load_in_8bit:
            raise ValueError("BnbxConfig: load_in_4bit and load_in_8bit are both True; choose one")
        self._load_in_4bit = value

    @property
    def load_in_8bit(self) -> bool:
        return self._load_in_8bit

    @load_in_8bit.setter
    def load_in_8bit(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"BnbxConfig: load_in_8bit must be a bool, got {value!r}")
        if value and self.load_in_4bit:
            raise ValueError("BnbxConfig: load_in_4bit and load_in_8bit are both True; choose one")
        self._load_in_8bit = value

    @property
    def method(self) -> str:
        """The short name: nf4, fp4, int8 (threshold 0), llm.int8, absmax8, zeropoint8 or blockwise8."""
        if self.weight_only:
            return self.weight_only
        if self.load_in_4bit:
            return self.bnb_4bit_quant_type
        return "int8" if self.llm_int8_threshold == 0 else "llm.int8"

    def quantization_method(self) -> str:
        """As ``BitsAndBytesConfig.quantization_method()``: ``llm_int8``, ``fp4``, ``nf4`` (or the weight-only name)."""
        if self.weight_only:
            return self.weight_only
        return self.bnb_4bit_quant_type if self.load_in_4bit else "llm_int8"

    @classmethod
    def for_method(
        cls,
        method: str,
        double_quant: bool = False,
        blocksize: Optional[int] = None,
        compute_dtype: Any = None,
        **kwargs: Any,
    ) -> "BnbxConfig":
        """The config of a method name (``bnbx quantize --method``)."""
        if method in ("nf4", "fp4"):
            return cls(
                load_in_4bit=True,
                bnb_4bit_quant_type=method,
                bnb_4bit_use_double_quant=double_quant,
                blocksize=blocksize,
                bnb_4bit_compute_dtype=compute_dtype,
                **kwargs,
            )
        if double_quant:
            raise ValueError(f"double quantization applies to nf4 and fp4, not {method!r}")
        if method in ("int8", "llm.int8"):
            threshold = 0.0 if method == "int8" else kwargs.pop("llm_int8_threshold", 6.0)
            return cls(load_in_8bit=True, llm_int8_threshold=threshold, **kwargs)
        if method in WEIGHT_ONLY:
            return cls(weight_only=method, blocksize=blocksize, **kwargs)
        from .quantize import METHODS

        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")

    @classmethod
    def from_bitsandbytes_config(cls, config: Any, blocksize: Optional[int] = None) -> "BnbxConfig":
        """The same settings as a transformers ``BitsAndBytesConfig`` (or its dict)."""
        values = config if isinstance(config, dict) else config.to_dict()
        keys = (
            "load_in_8bit",
            "load_in_4bit",
            "llm_int8_threshold",
            "llm_int8_skip_modules",
            "llm_int8_enable_fp32_cpu_offload",
            "llm_int8_has_fp16_weight",
            "bnb_4bit_compute_dtype",
            "bnb_4bit_quant_type",
            "bnb_4bit_use_double_quant",
            "bnb_4bit_quant_storage",
        )
        return cls(**{key: values[key] for key in keys if key in values}, blocksize=blocksize)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with ``quant_method: "bnbx"`` (see the module docstring for ``bits``)."""
        return {
            "quant_method": "bnbx",
            "bits": 4 if self.load_in_4bit else 8,
            "weight_only": self.weight_only,
            "llm_int8_threshold": self.llm_int8_threshold,
            "llm_int8_skip_modules": copy.deepcopy(self.llm_int8_skip_modules),
            "llm_int8_enable_fp32_cpu_offload": self.llm_int8_enable_fp32_cpu_offload,
            "llm_int8_has_fp16_weight": self.llm_int8_has_fp16_weight,
            "bnb_4bit_compute_dtype": _dtype_name(self.bnb_4bit_compute_dtype),
            "bnb_4bit_quant_type": self.bnb_4bit_quant_type,
            "bnb_4bit_use_double_quant": self.bnb_4bit_use_double_quant,
            "bnb_4bit_quant_storage": _dtype_name(self.bnb_4bit_quant_storage),
            "blocksize": self.blocksize,
        }

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs: Any):
        config = cls(**config_dict)
        unused = {key: value for key, value in kwargs.items() if not hasattr(config, key)}
        for key, value in kwargs.items():
            if key not in unused:
                setattr(config, key, value)
        return (config, unused) if return_unused_kwargs else config

    def to_diff_dict(self) -> dict[str, Any]:
        defaults = BnbxConfig(load_in_4bit=True).to_dict()
        return {
            key: value
            for key, value in self.to_dict().items()
            if key in ("quant_method", "bits") or value != defaults.get(key)
        }

    def to_json_string(self, use_diff: bool = True) -> str:
        return json.dumps(self.to_diff_dict() if use_diff else self.to_dict(), indent=2, sort_keys=True) + "\n"

    def __iter__(self):
        yield from self.to_dict().items()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BnbxConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"BnbxConfig {self.to_json_string()}"
