"""Hypothesis fuzzing: hostile checkpoint metadata and hostile op arguments give a result or a clean
TypeError / ValueError / RuntimeError, never a crash, a hang or another exception type."""

from __future__ import annotations

import json

import pytest
import torch

import bnbx
from bnbx import QuantState
from bnbx import functional as F

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

CLEAN = (TypeError, ValueError, RuntimeError)
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.uint8, torch.int8, torch.int32,
          torch.int64, torch.bool]  # fmt: skip
SPECIALS = [float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1e-45, 3e38, -1.0, 1.0]


@st.composite
def tensors(draw, max_numel: int = 300) -> torch.Tensor:
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.lists(st.integers(0, 9), min_size=0, max_size=3))
    numel = 1
    for size in shape:
        numel *= size
    if numel > max_numel:
        shape = [numel % max_numel]
    values = torch.randn(shape) * draw(st.sampled_from([1e-40, 1.0, 1e30]))
    if values.numel() and draw(st.booleans()):
        values.view(-1)[draw(st.integers(0, values.numel() - 1))] = draw(st.sampled_from(SPECIALS))
    if dtype.is_floating_point:
        values = values.to(dtype)
    elif dtype == torch.bool:
        values = values > 0
    else:
        values = values.nan_to_num(0, 0, 0).clamp(-100, 100).to(dtype)
    if values.dim() == 2 and draw(st.booleans()):
        values = values.t()  # non-contiguous
    return values


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, -1, 1, 16, 31, 32, 64, 100, 256, 4096, 8192, 16384, 32768, 2**31, 2**62, 2**63 - 1]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.sampled_from(["nf4", "fp4", "dynamic", "int4", "float32", "bfloat16", "tensor", "group", "channel"]),
    st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.uint8, torch.float64]),
    st.lists(st.integers(-3, 2**40), max_size=4),
)
values = st.one_of(scalars, tensors())


def valid_dict(kind: str, nested: bool, packed: bool) -> dict:
    A = torch.randn(17, 33)
    if kind in ("nf4", "fp4"):
        _, state = F.quantize_4bit(A, blocksize=32, quant_type=kind, compress_statistics=nested)
    else:
        _, state = F.quantize_blockwise(A, blocksize=64, nested=nested)
    return state.as_dict(packed=packed)


JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=8)),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=8,
)
KEYS = [
    "quant_type", "blocksize", "dtype", "shape", "absmax", "quant_map", "nested_absmax", "nested_quant_map",
    "nested_blocksize", "nested_dtype", "nested_offset", "w.absmax", "quant_state.bitsandbytes__nf4", "junk",
]  # fmt: skip


@st.composite
def hostile_dicts(draw) -> dict:
    kind = draw(st.sampled_from(["nf4", "fp4", "dynamic"]))
    packed = draw(st.booleans())
    items = valid_dict(kind, draw(st.booleans()), packed)
    for _ in range(draw(st.integers(1, 3))):
        action = draw(st.sampled_from(["set", "delete", "blob_bytes", "blob_json"]))
        blob_keys = [key for key in items if "quant_state" in key]
        if action == "set":
            items[draw(st.sampled_from(KEYS + sorted(items)))] = draw(values)
        elif action == "delete" and items:
            items.pop(draw(st.sampled_from(sorted(items))))
        elif action == "blob_bytes" and blob_keys:
            raw = draw(st.binary(max_size=200))
            items[blob_keys[0]] = torch.tensor(list(raw), dtype=torch.uint8)
        elif action == "blob_json" and blob_keys:
            try:  # the blob may already be corrupt from an earlier step
                metadata = json.loads(bytes(items[blob_keys[0]].tolist()))
                assert isinstance(metadata, dict)
            except (AttributeError, TypeError, ValueError, AssertionError):
                continue
            metadata[draw(st.sampled_from(sorted(metadata) + ["extra"]))] = draw(JSON_VALUES)
            items[blob_keys[0]] = torch.tensor(list(json.dumps(metadata).encode()), dtype=torch.uint8)
    return items


@FUZZ
@given(hostile_dicts())
def test_from_dict_never_crashes(items):
    try:
        state = QuantState.from_dict(items)
    except CLEAN:
        return
    assert isinstance(state, QuantState)
    # a state that loads must also decode data of its own size
    if state.quant_type in ("nf4", "fp4"):
        packed = torch.zeros((state.numel + 1) // 2, 1, dtype=torch.uint8)
        assert F.dequantize_4bit(packed, state).shape == state.shape
    else:
        codes = torch.zeros(state.absmax.numel() * state.blocksize, dtype=torch.uint8)
        assert F.dequantize_blockwise(codes, state).numel() == codes.numel()


@FUZZ
@given(st.one_of(values, st.dictionaries(st.one_of(st.text(max_size=30), st.integers()), values, max_size=6)))
def test_from_dict_rejects_arbitrary_objects(obj):
    try:
        QuantState.from_dict(obj)
    except CLEAN:
        return
    pytest.fail(f"from_dict accepted {obj!r}")


# Every op, called with a mix of sensible and hostile arguments.
CALLS = {
    "quantize_4bit": (F.quantize_4bit, ["A", "absmax", "out", "blocksize", "compress_statistics", "quant_type",
                                        "quant_storage"]),
    "dequantize_4bit": (F.dequantize_4bit, ["A", "quant_state", "absmax", "out", "blocksize", "quant_type"]),
    "quantize_blockwise": (F.quantize_blockwise, ["A", "code", "absmax", "out", "blocksize", "nested"]),
    "dequantize_blockwise": (F.dequantize_blockwise, ["A", "quant_state", "absmax", "code", "out", "blocksize"]),
    "quantize_int8": (F.quantize_int8, ["A", "granularity", "symmetric", "axis", "group_size"]),
    "create_dynamic_map": (F.create_dynamic_map, ["signed", "max_exponent_bits", "total_bits"]),
    "create_fp8_map": (F.create_fp8_map, ["signed", "exponent_bits", "precision_bits", "total_bits"]),
    "create_linear_map": (F.create_linear_map, ["signed", "total_bits", "add_zero"]),
    "create_normal_map": (F.create_normal_map, ["offset", "use_extra_value"]),
    "op.quantize_4bit": (torch.ops.bnbx.quantize_4bit, ["A", "blocksize", "quant_type", "quant_storage"]),
    "op.dequantize_4bit": (torch.ops.bnbx.dequantize_4bit, ["A", "absmax", "blocksize", "quant_type", "shape",
                                                            "dtype"]),
    "op.quantize_blockwise": (torch.ops.bnbx.quantize_blockwise, ["A", "code", "blocksize"]),
    "op.dequantize_blockwise": (torch.ops.bnbx.dequantize_blockwise, ["A", "absmax", "code", "blocksize", "dtype"]),
    "op.quantize_int8": (torch.ops.bnbx.quantize_int8, ["A", "group_size", "symmetric"]),
    "op.dequantize_int8": (torch.ops.bnbx.dequantize_int8, ["A", "scale", "zero_point", "group_size", "dtype"]),
}  # fmt: skip


def sensible(name: str, A: torch.Tensor):
    # a plausible value per parameter, so the fuzzer also reaches the checks behind the first one
    packed, state = F.quantize_4bit(torch.randn(64), blocksize=32)
    options = {
        "A": A, "absmax": state.absmax, "out": None, "blocksize": 64, "compress_statistics": True,
        "quant_type": "nf4", "quant_storage": torch.uint8, "quant_state": state, "code": F.create_dynamic_map(),
        "nested": True, "granularity": "group", "symmetric": False, "axis": 0, "group_size": 32, "signed": True,
        "max_exponent_bits": 4, "total_bits": 5, "exponent_bits": 2, "precision_bits": 2, "add_zero": False,
        "offset": 0.9, "use_extra_value": False, "shape": [64], "dtype": torch.bfloat16, "scale": state.absmax,
        "zero_point": torch.zeros(2, dtype=torch.int32),
    }  # fmt: skip
    return options[name]


@FUZZ
@given(st.sampled_from(sorted(CALLS)), st.data())
def test_ops_never_crash(name, data):
    fn, params = CALLS[name]
    A = data.draw(tensors())
    args = [data.draw(values) if data.draw(st.integers(0, 2)) == 0 else sensible(param, A) for param in params]
    try:
        fn(*args)
    except CLEAN:
        pass


@FUZZ
@given(tensors(), st.sampled_from(["tensor", "channel", "token", "group"]), st.integers(-3, 3), st.integers(1, 70))
def test_dequantize_int8_with_a_hostile_state_never_crashes(A, granularity, axis, group_size):
    try:
        q, state = F.quantize_int8(A, granularity, True, axis, group_size)
        state.scale = state.scale.flip(0) if state.scale.dim() else state.scale * float("nan")
        F.dequantize_int8(q, state, torch.float16)
    except CLEAN:
        pass


def test_fuzz_reaches_the_library():
    # guard against a fuzzer that only ever feeds rejects: the sensible arguments work
    A = torch.randn(64)
    assert bnbx.dequantize_4bit(*F.quantize_4bit(A, blocksize=64)).shape == A.shape
