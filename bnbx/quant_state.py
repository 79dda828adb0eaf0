"""``QuantState``: the metadata that turns packed 4-bit (or 8-bit) codes back into a tensor.

Serialised with bitsandbytes' key names so checkpoints move between the two libraries unchanged
(``weight.absmax``, ``weight.quant_map``, ``weight.nested_absmax``, ``weight.nested_quant_map``,
``weight.quant_state.bitsandbytes__nf4``). Non-tensor fields travel as UTF-8 JSON in a uint8 tensor, so a
state dict holds tensors only (safetensors-friendly, no pickle).

Loading is strict, since checkpoint metadata may be corrupt or hostile: an exact key set, enum values from
fixed allowlists (never ``getattr(torch, name)``), sizes checked against each other, and every error a
``ValueError`` that names the key. These checks are plain ``if``/``raise``, so ``python -O`` keeps them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ._formats import (
    BLOCKSIZES,
    BLOCKSIZES_8BIT,
    BLOCKWISE_QUANT_TYPE,
    DYNAMIC_MAP_SIZE,
    FOUR_BIT_CODE_SIZE,
    QUANT_TYPES,
    canonical_code,
)
from ._formats import DTYPES as _DTYPES
from ._formats import dtype_name as _dtype_to_name

__all__ = ["QuantState", "as_quant_state", "canonical_code"]

_MAX_METADATA_BYTES = 4096
_MAX_ELEMENTS = 2**62
_PACKED_KEY_PREFIX = "quant_state.bitsandbytes__"
_PACKED_SUFFIXES = (*QUANT_TYPES, BLOCKWISE_QUANT_TYPE)
_JSON_KEYS = {"quant_type", "blocksize", "dtype", "shape"}
_NESTED_JSON_KEYS = {"nested_blocksize", "nested_dtype", "nested_offset"}
_TENSOR_KEYS = {"absmax", "quant_map"}
_NESTED_TENSOR_KEYS = {"nested_absmax", "nested_quant_map"}


@dataclass(eq=False)
class QuantState:
    """Everything needed to dequantize a packed tensor; bitsandbytes' constructor and field names.

    Attributes:
        absmax: fp32 ``[ceil(n / blocksize)]``, one max-|x| per block; uint8 of the same shape when nested
            (double quantization), decoded with ``state2`` and ``offset``.
        shape: the original tensor's shape (``None`` only in 8-bit states loaded from bitsandbytes, which
            does not record it; 8-bit dequantization takes the shape of its input).
        code: fp32 code table: ``[16]`` (the NF4/FP4 values) for 4-bit, ``[256]`` for 8-bit blockwise.
        blocksize: elements per block (powers of two: 32 to 4096 for 4-bit, 32 to 16384 for 8-bit).
        quant_type: ``"nf4"``, ``"fp4"``, or ``"dynamic"`` for 8-bit blockwise (any 256-value code).
        dtype: the original tensor's dtype (fp32, fp16 or bf16).
        offset: 0-dim fp32, the mean subtracted from absmax before it was quantized (nested only).
        state2: the QuantState of the quantized absmax (nested only).
    """

    absmax: torch.Tensor
    shape: Optional[torch.Size] = None
    code: Optional[torch.Tensor] = None
    blocksize: Optional[int] = None
    quant_type: Optional[str] = None
    dtype: Optional[torch.dtype] = None
    offset: Optional[torch.Tensor] = None
    state2: Optional[QuantState] = None

    @property
    def nested(self) -> bool:
        """True when absmax is itself 8-bit quantized (double quantization)."""
        return self.state2 is not None

    @property
    def numel(self) -> int:
        if self.shape is None:
            raise ValueError("QuantState: this state records no shape (an 8-bit state from bitsandbytes)")
        return math.prod(self.shape)

    def get_absmax(self) -> torch.Tensor:
        """The fp32 absmax per block, decoding the nested (double-quantized) form when there is one."""
        if self.state2 is None:
            return self.absmax
        # the op directly (not functional.py, which imports this module)
        state2 = self.state2
        nested = torch.ops.bnbx.dequantize_blockwise(
            self.absmax, state2.get_absmax(), state2.code, state2.blocksize, torch.float32
        )
        return nested + self.offset

    def to(self, device: torch.device | str) -> QuantState:
        """Move every tensor to ``device``, in place (as bitsandbytes does); also returns ``self``."""
        self.absmax = self.absmax.to(device)
        if self.code is not None:
            self.code = self.code.to(device)
        if self.offset is not None:
            self.offset = self.offset.to(device)
        if self.state2 is not None:
            self.state2.to(device)
        return self

    def __eq__(self, other: object) -> bool:
        """Exact equality of every field (tensors compared with ``torch.equal``)."""
        if not isinstance(other, QuantState):
            return NotImplemented

        def same(a: Any, b: Any) -> bool:
            if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
                return a.device == b.device and torch.equal(a, b)
            return a == b

        return all(
            same(getattr(self, name), getattr(other, name))
            for name in ("absmax", "shape", "code", "blocksize", "quant_type", "dtype", "offset", "state2")
        )

    # --- bitsandbytes interop --------------------------------------------------------------------------------

    @classmethod
    def from_bitsandbytes(cls, state: Any) -> QuantState:
        """Convert a ``bitsandbytes.functional.QuantState`` (4-bit or 8-bit, nested or not) through its
        ``as_dict(packed=True)`` and :meth:`from_dict`'s strict checks (no pickle), keeping its device."""
        if not _is_bitsandbytes_state(state):
            raise TypeError(
                f"QuantState.from_bitsandbytes: expected a bitsandbytes QuantState, got {_type_name(state)}"
            )
        absmax = getattr(state, "absmax", None)
        if not isinstance(absmax, torch.Tensor):
            raise ValueError("QuantState.from_bitsandbytes: the state's absmax is not a tensor")
        return cls.from_dict(state.as_dict(packed=True), device=absmax.device)

    # --- serialisation -------------------------------------------------------------------------------------

    def as_dict(self, packed: bool = False) -> dict[str, Any]:
        """bitsandbytes-compatible dict. With ``packed=True`` only tensors: the non-tensor fields become
        ``quant_state.bitsandbytes__<quant_type>``, a uint8 tensor of UTF-8 JSON (keys to prefix with
        ``"<param>."``, e.g. ``weight.absmax``). 8-bit states use the suffix ``dynamic`` (bitsandbytes leaves
        its 8-bit states unpacked)."""
        items: dict[str, Any] = {
            "quant_type": self.quant_type,
            "absmax": self.absmax,
            "blocksize": self.blocksize,
            "quant_map": self.code.clone(),  # states share one cached table; safetensors refuses shared tensors
            "dtype": _dtype_to_name(self.dtype),
            "shape": None if self.shape is None else tuple(self.shape),
        }
        if self.state2 is not None:
            items.update(
                {
                    "nested_absmax": self.state2.absmax,
                    "nested_blocksize": self.state2.blocksize,
                    "nested_quant_map": self.state2.code.clone(),  # a clone so safetensors keeps it
                    "nested_dtype": _dtype_to_name(self.state2.dtype),
                    "nested_offset": float(self.offset.item()),
                }
            )
        if not packed:
            return items
        if items["quant_type"] is None:
            items["quant_type"] = BLOCKWISE_QUANT_TYPE
        tensors = {key: value for key, value in items.items() if isinstance(value, torch.Tensor)}
        metadata = {key: value for key, value in items.items() if not isinstance(value, torch.Tensor)}
        blob = json.dumps(metadata).encode("utf-8")
        tensors[_PACKED_KEY_PREFIX + items["quant_type"]] = torch.tensor(list(blob), dtype=torch.uint8)
        return tensors

    @classmethod
    def from_dict(cls, qs_dict: dict[str, Any], device: torch.device | str = "cpu") -> QuantState:
        """Rebuild a QuantState from ``as_dict`` output (bnbx's or bitsandbytes'), packed or not, with or
        without a key prefix such as ``"weight."``: 4-bit (nf4/fp4), 8-bit blockwise (``quant_type``
        ``"dynamic"``, or ``None`` as bitsandbytes writes it) with any valid 256-value code, nested or not.
        Raises ``ValueError`` naming the key for anything missing, unknown, malformed or inconsistent."""
        fields = _unpack(qs_dict)
        quant_type = fields.get("quant_type")
        if quant_type is not None:
            quant_type = _enum(fields, "quant_type", _PACKED_SUFFIXES)
        four_bit = quant_type in QUANT_TYPES
        blocksize = _integer(fields, "blocksize", allowed=BLOCKSIZES if four_bit else BLOCKSIZES_8BIT)
        dtype = _DTYPES[_enum(fields, "dtype", tuple(_DTYPES))]
        shape = _shape(fields, optional=not four_bit)
        blocks = None if shape is None else -(-math.prod(shape) // blocksize)
        nested = "nested_absmax" in fields or any(key in fields for key in _NESTED_JSON_KEYS)

        expected = _JSON_KEYS | _TENSOR_KEYS | ((_NESTED_JSON_KEYS | _NESTED_TENSOR_KEYS) if nested else set())
        missing = sorted(expected - set(fields))
        unknown = sorted(set(fields) - expected)
        if missing:
            raise ValueError(f"QuantState.from_dict: missing key(s) {missing}")
        if unknown:
            raise ValueError(f"QuantState.from_dict: unknown key(s) {unknown}")

        if four_bit:
            code = _tensor(fields, "quant_map", torch.float32, FOUR_BIT_CODE_SIZE)
            if not torch.equal(code.cpu(), canonical_code(quant_type)):
                raise ValueError(f"QuantState.from_dict: quant_map is not the standard {quant_type} table")
            code = canonical_code(quant_type)
        else:
            quant_type = BLOCKWISE_QUANT_TYPE
            code = _code(fields, "quant_map")
        shape = None if shape is None else torch.Size(shape)

        if not nested:
            absmax = _tensor(fields, "absmax", torch.float32, blocks)
            _check_finite_nonnegative("absmax", absmax)
            return cls(absmax.to(device), shape, code.to(device), blocksize, quant_type, dtype)

        absmax = _tensor(fields, "absmax", torch.uint8, blocks)
        nested_blocksize = _integer(fields, "nested_blocksize", allowed=BLOCKSIZES_8BIT)
        _enum(fields, "nested_dtype", ("float32",))
        offset = fields["nested_offset"]
        if isinstance(offset, bool) or not isinstance(offset, (int, float)) or not math.isfinite(offset):
            raise ValueError(f"QuantState.from_dict: nested_offset must be a finite number, got {offset!r}")
        nested_absmax = _tensor(fields, "nested_absmax", torch.float32, -(-absmax.numel() // nested_blocksize))
        _check_finite_nonnegative("nested_absmax", nested_absmax)
        nested_code = _code(fields, "nested_quant_map")
        state2 = cls(
            nested_absmax.to(device), torch.Size([absmax.numel()]), nested_code.to(device), nested_blocksize,
            BLOCKWISE_QUANT_TYPE, torch.float32,
        )  # fmt: skip
        return cls(
            absmax.to(device), shape, code.to(device), blocksize, quant_type, dtype,
            offset=torch.tensor(float(offset), dtype=torch.float32, device=device), state2=state2,
        )  # fmt: skip


def _type_name(value: Any) -> str:
    return f"{type(value).__module__}.{type(value).__qualname__}"


def _is_bitsandbytes_state(value: Any) -> bool:
    cls = type(value)
    return cls.__name__ == "QuantState" and cls.__module__.split(".")[0] == "bitsandbytes"


def as_quant_state(op: str, state: Any, name: str = "quant_state") -> QuantState:
    """``state`` as a bnbx QuantState: itself, or a bitsandbytes QuantState converted; TypeError otherwise."""
    if isinstance(state, QuantState):
        return state
    if _is_bitsandbytes_state(state):
        return QuantState.from_bitsandbytes(state)
    raise TypeError(
        f"{op}: {name} must be a bnbx.QuantState or a bitsandbytes QuantState, got {_type_name(state)}"
    )


# --- strict readers for untrusted dicts ----------------------------------------------------------------------


def _unpack(qs_dict: dict[str, Any]) -> dict[str, Any]:
    """Strip key prefixes and decode the packed JSON blob, rejecting anything malformed."""
    if not isinstance(qs_dict, dict):
        raise ValueError(f"QuantState.from_dict: expected a dict, got {type(qs_dict).__name__}")
    fields: dict[str, Any] = {}
    blobs = [key for key in qs_dict if isinstance(key, str) and "quant_state." in key]
    if len(blobs) > 1:
        raise ValueError(f"QuantState.from_dict: more than one packed quant_state key: {sorted(blobs)}")
    for key, value in qs_dict.items():
        if not isinstance(key, str):
            raise ValueError(f"QuantState.from_dict: keys must be strings, got {key!r}")
        if key in blobs:
            continue
        short = key.rsplit(".", 1)[-1]
        if short in fields:
            raise ValueError(f"QuantState.from_dict: key {short!r} appears more than once")
        fields[short] = value
    if blobs:
        key = blobs[0]
        suffix = key.split("quant_state.", 1)[1]
        if suffix not in (_PACKED_KEY_PREFIX.split(".", 1)[1] + t for t in _PACKED_SUFFIXES):
            raise ValueError(
                f"QuantState.from_dict: {key!r} must end in bitsandbytes__nf4, bitsandbytes__fp4 or "
                "bitsandbytes__dynamic"
            )
        for name, value in _decode_blob(key, qs_dict[key]).items():
            if name in fields:
                raise ValueError(f"QuantState.from_dict: key {name!r} is both a tensor and in {key!r}")
            fields[name] = value
        if fields.get("quant_type") != suffix.rsplit("__", 1)[1]:
            raise ValueError(f"QuantState.from_dict: quant_type in {key!r} does not match the key's suffix")
    elif "quant_type" not in fields:
        raise ValueError("QuantState.from_dict: found neither a packed quant_state key nor a 'quant_type' item")
    return fields


def _decode_blob(key: str, blob: Any) -> dict[str, Any]:
    if not isinstance(blob, torch.Tensor) or blob.dtype != torch.uint8 or blob.dim() != 1:
        raise ValueError(f"QuantState.from_dict: {key!r} must be a 1-D uint8 tensor of UTF-8 JSON")
    if blob.numel() > _MAX_METADATA_BYTES:
        raise ValueError(f"QuantState.from_dict: {key!r} is {blob.numel()} bytes, over the {_MAX_METADATA_BYTES} limit")
    try:
        text = bytes(blob.cpu().tolist()).decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"QuantState.from_dict: {key!r} is not UTF-8: {error}") from None

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        names = [name for name, _ in pairs]
        if len(names) != len(set(names)):
            raise ValueError(f"QuantState.from_dict: {key!r} repeats a JSON key")
        return dict(pairs)

    def no_constants(name: str) -> Any:
        raise ValueError(f"QuantState.from_dict: {key!r} holds the non-standard JSON value {name}")

    try:
        metadata = json.loads(text, object_pairs_hook=no_duplicates, parse_constant=no_constants)
    except json.JSONDecodeError as error:
        raise ValueError(f"QuantState.from_dict: {key!r} is not valid JSON: {error}") from None
    if not isinstance(metadata, dict):
        raise ValueError(f"QuantState.from_dict: {key!r} must hold a JSON object")
    unknown = sorted(set(metadata) - _JSON_KEYS - _NESTED_JSON_KEYS)
    if unknown:
        raise ValueError(f"QuantState.from_dict: unknown key(s) {unknown} in {key!r}")
    return metadata


def _enum(fields: dict[str, Any], key: str, allowed: tuple[str, ...]) -> str:
    value = fields.get(key)
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"QuantState.from_dict: {key} must be one of {list(allowed)}, got {value!r}")
    return value


def _integer(fields: dict[str, Any], key: str, allowed: tuple[int, ...]) -> int:
    value = fields.get(key)
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = int(value.item())
    if isinstance(value, bool) or not isinstance(value, int) or value not in allowed:
        raise ValueError(f"QuantState.from_dict: {key} must be one of {list(allowed)}, got {value!r}")
    return value


def _shape(fields: dict[str, Any], optional: bool) -> Optional[tuple[int, ...]]:
    value = fields.get("shape")
    if value is None and optional:
        return None
    if isinstance(value, torch.Size):
        value = tuple(value)
    if not isinstance(value, (list, tuple)) or len(value) > 16:
        raise ValueError(f"QuantState.from_dict: shape must be a list of at most 16 sizes, got {value!r}")
    n = 1
    for size in value:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"QuantState.from_dict: shape must hold non-negative integers, got {value!r}")
        n *= size
        if n > _MAX_ELEMENTS:
            raise ValueError(f"QuantState.from_dict: shape {value!r} has too many elements")
    return tuple(value)


def _tensor(fields: dict[str, Any], key: str, dtype: torch.dtype, numel: Optional[int]) -> torch.Tensor:
    """A tensor of ``dtype`` with ``numel`` values (any 1-D length when the state records no shape)."""
    value = fields.get(key)
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"QuantState.from_dict: {key} must be a tensor, got {type(value).__name__}")
    if value.dtype != dtype:
        raise ValueError(
            f"QuantState.from_dict: {key} must be {_dtype_to_name(dtype)}, got {_dtype_to_name(value.dtype)}"
        )
    if numel is None:
        if value.dim() != 1:
            raise ValueError(f"QuantState.from_dict: {key} must be 1-D, got shape {list(value.shape)}")
    elif value.numel() != numel:
        raise ValueError(f"QuantState.from_dict: {key} must hold {numel} values for this shape, got {value.numel()}")
    return value.reshape(-1).contiguous()


def _code(fields: dict[str, Any], key: str) -> torch.Tensor:
    """An 8-bit code: 256 finite fp32 values in [-1, 1], sorted non-decreasing (few-bit maps repeat zeros)."""
    code = _tensor(fields, key, torch.float32, DYNAMIC_MAP_SIZE)
    values = code.cpu()
    if not bool(torch.isfinite(values).all()) or not bool((values.abs() <= 1).all()):
        raise ValueError(f"QuantState.from_dict: {key} must hold finite values in [-1, 1]")
    if not bool((values[1:] >= values[:-1]).all()):
        raise ValueError(f"QuantState.from_dict: {key} must be sorted in non-decreasing order")
    return code


def _check_finite_nonnegative(key: str, values: torch.Tensor) -> None:
    if values.numel() and not bool((torch.isfinite(values) & (values >= 0)).all()):
        raise ValueError(f"QuantState.from_dict: {key} holds NaN, Inf or negative values")
