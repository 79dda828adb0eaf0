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

from ._formats import BLOCKSIZES, DYNAMIC_MAP_SIZE, QUANT_TYPES, canonical_code
from ._formats import DTYPES as _DTYPES
from ._formats import dtype_name as _dtype_to_name

__all__ = ["QuantState", "canonical_code"]

_MAX_METADATA_BYTES = 4096
_MAX_ELEMENTS = 2**62
_PACKED_KEY_PREFIX = "quant_state.bitsandbytes__"
_JSON_KEYS = {"quant_type", "blocksize", "dtype", "shape"}
_NESTED_JSON_KEYS = {"nested_blocksize", "nested_dtype", "nested_offset"}
_TENSOR_KEYS = {"absmax", "quant_map"}
_NESTED_TENSOR_KEYS = {"nested_absmax", "nested_quant_map"}


@dataclass
class QuantState:
    """Everything needed to dequantize a packed tensor.

    Attributes:
        absmax: fp32 ``[ceil(n / blocksize)]``, one max-|x| per block; uint8 of the same shape when nested
            (double quantization), decoded with ``state2`` and ``offset``.
        shape: the original tensor's shape.
        code: fp32 code table: ``[16]`` (the NF4/FP4 values) for 4-bit, ``[256]`` for 8-bit blockwise.
        blocksize: elements per block (a power of two from 32 to 4096).
        quant_type: ``"nf4"``, ``"fp4"``, or ``"dynamic"`` for 8-bit blockwise.
        dtype: the original tensor's dtype (fp32, fp16 or bf16).
        offset: 0-dim fp32, the mean subtracted from absmax before it was quantized (nested only).
        state2: the QuantState of the quantized absmax (nested only).
    """

    absmax: torch.Tensor
    shape: torch.Size
    code: torch.Tensor
    blocksize: int
    quant_type: str
    dtype: torch.dtype
    offset: Optional[torch.Tensor] = None
    state2: Optional["QuantState"] = None

    @property
    def nested(self) -> bool:
        """True when absmax is itself 8-bit quantized (double quantization)."""
        return self.state2 is not None

    @property
    def numel(self) -> int:
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

    def to(self, device: torch.device | str) -> "QuantState":
        """Move every tensor to ``device``, in place (as bitsandbytes does); also returns ``self``."""
        self.absmax = self.absmax.to(device)
        self.code = self.code.to(device)
        if self.offset is not None:
            self.offset = self.offset.to(device)
        if self.state2 is not None:
            self.state2.to(device)
        return self

    # --- serialisation -------------------------------------------------------------------------------------

    def as_dict(self, packed: bool = False) -> dict[str, Any]:
        """bitsandbytes-compatible dict. With ``packed=True`` only tensors: the non-tensor fields become
        ``quant_state.bitsandbytes__<quant_type>``, a uint8 tensor of UTF-8 JSON (keys to prefix with
        ``"<param>."``, e.g. ``weight.absmax``)."""
        items: dict[str, Any] = {
            "quant_type": self.quant_type,
            "absmax": self.absmax,
            "blocksize": self.blocksize,
            "quant_map": self.code,
            "dtype": _dtype_to_name(self.dtype),
            "shape": tuple(self.shape),
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
        tensors = {key: value for key, value in items.items() if isinstance(value, torch.Tensor)}
        metadata = {key: value for key, value in items.items() if not isinstance(value, torch.Tensor)}
        blob = json.dumps(metadata).encode("utf-8")
        tensors[_PACKED_KEY_PREFIX + self.quant_type] = torch.tensor(list(blob), dtype=torch.uint8)
        return tensors

    @classmethod
    def from_dict(cls, qs_dict: dict[str, Any], device: torch.device | str = "cpu") -> "QuantState":
        """Rebuild a 4-bit QuantState from ``as_dict`` output, packed or not, with or without a key prefix
        such as ``"weight."``. Raises ``ValueError`` naming the key for anything missing, unknown,
        malformed or inconsistent."""
        fields = _unpack(qs_dict)
        quant_type = _enum(fields, "quant_type", QUANT_TYPES)
        blocksize = _integer(fields, "blocksize", allowed=BLOCKSIZES)
        dtype = _DTYPES[_enum(fields, "dtype", tuple(_DTYPES))]
        shape = _shape(fields)
        n = math.prod(shape)
        blocks = -(-n // blocksize)
        nested = "nested_absmax" in fields or any(key in fields for key in _NESTED_JSON_KEYS)

        expected = _JSON_KEYS | _TENSOR_KEYS | ((_NESTED_JSON_KEYS | _NESTED_TENSOR_KEYS) if nested else set())
        missing = sorted(expected - set(fields))
        unknown = sorted(set(fields) - expected)
        if missing:
            raise ValueError(f"QuantState.from_dict: missing key(s) {missing}")
        if unknown:
            raise ValueError(f"QuantState.from_dict: unknown key(s) {unknown}")

        code = _tensor(fields, "quant_map", torch.float32, 16)
        canonical = canonical_code(quant_type)
        if not torch.equal(code.cpu(), canonical):
            raise ValueError(f"QuantState.from_dict: quant_map is not the standard {quant_type} table")

        if not nested:
            absmax = _tensor(fields, "absmax", torch.float32, blocks)
            _check_finite_nonnegative("absmax", absmax)
            return cls(absmax.to(device), torch.Size(shape), canonical.to(device), blocksize, quant_type, dtype)

        absmax = _tensor(fields, "absmax", torch.uint8, blocks)
        nested_blocksize = _integer(fields, "nested_blocksize", allowed=BLOCKSIZES)
        if _enum(fields, "nested_dtype", ("float32",)) != "float32":  # pragma: no cover - _enum raises first
            raise ValueError("QuantState.from_dict: nested_dtype must be float32")
        offset = fields["nested_offset"]
        if isinstance(offset, bool) or not isinstance(offset, (int, float)) or not math.isfinite(offset):
            raise ValueError(f"QuantState.from_dict: nested_offset must be a finite number, got {offset!r}")
        nested_absmax = _tensor(fields, "nested_absmax", torch.float32, -(-blocks // nested_blocksize))
        _check_finite_nonnegative("nested_absmax", nested_absmax)
        nested_code = _tensor(fields, "nested_quant_map", torch.float32, DYNAMIC_MAP_SIZE)
        if not bool(torch.isfinite(nested_code).all()) or not bool((nested_code[1:] >= nested_code[:-1]).all()):
            raise ValueError("QuantState.from_dict: nested_quant_map must be finite and sorted")
        state2 = cls(
            nested_absmax.to(device), torch.Size([blocks]), nested_code.to(device), nested_blocksize, "dynamic",
            torch.float32,
        )
        return cls(
            absmax.to(device), torch.Size(shape), canonical.to(device), blocksize, quant_type, dtype,
            offset=torch.tensor(float(offset), dtype=torch.float32, device=device), state2=state2,
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
        if suffix not in (_PACKED_KEY_PREFIX.split(".", 1)[1] + t for t in QUANT_TYPES):
            raise ValueError(f"QuantState.from_dict: {key!r} must end in bitsandbytes__nf4 or bitsandbytes__fp4")
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


def _shape(fields: dict[str, Any]) -> tuple[int, ...]:
    value = fields.get("shape")
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


def _tensor(fields: dict[str, Any], key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
    value = fields.get(key)
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"QuantState.from_dict: {key} must be a tensor, got {type(value).__name__}")
    if value.dtype != dtype:
        raise ValueError(f"QuantState.from_dict: {key} must be {_dtype_to_name(dtype)}, got {_dtype_to_name(value.dtype)}")
    if value.numel() != numel:
        raise ValueError(f"QuantState.from_dict: {key} must hold {numel} values for this shape, got {value.numel()}")
    return value.reshape(-1).contiguous()


def _check_finite_nonnegative(key: str, values: torch.Tensor) -> None:
    if values.numel() and not bool((torch.isfinite(values) & (values >= 0)).all()):
        raise ValueError(f"QuantState.from_dict: {key} holds NaN, Inf or negative values")
