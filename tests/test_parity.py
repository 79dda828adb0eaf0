"""Drop-in parity with bitsandbytes.functional: signatures and defaults, code maps value for value, blocksizes,
QuantState round trips (4-bit, 8-bit, nested, custom codes) and bitsandbytes QuantState objects accepted."""

from __future__ import annotations

import inspect
import json

import pytest
import torch

from bnbx import QuantState
from bnbx import functional as F
from conftest import DTYPES, dtype_id
from reference import code_table_ref, dequantize_blockwise_ref, quantize_blockwise_ref

bnb = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is not installed")

# Public bitsandbytes.functional names that bnbx.functional deliberately leaves out: GPU memory and CUDA
# plumbing, optimizers, and the int8 matmul family (LLM.int8(), in bnbx.matmul).
NOT_IN_SCOPE = {
    "CUBLAS_Context", "GlobalPageManager", "batched_igemm", "check_matmul", "elementwise_func", "fill",
    "gemv_4bit", "get_paged", "get_ptr", "has_avx512bf16", "igemm", "int8_double_quant", "int8_linear_matmul",
    "int8_mm_dequant", "int8_vectorwise_dequant", "int8_vectorwise_quant", "is_on_gpu", "optimizer_update_32bit",
    "optimizer_update_8bit_blockwise", "prefetch_tensor",
}  # fmt: skip
STORAGE_NAMES = {
    "QuantState", "create_dynamic_map", "create_fp8_map", "create_linear_map", "create_normal_map",
    "dequantize_4bit", "dequantize_blockwise", "dequantize_fp4", "dequantize_nf4", "get_4bit_type",
    "quantize_4bit", "quantize_blockwise", "quantize_fp4", "quantize_nf4",
}  # fmt: skip


def public_callables(module) -> set[str]:
    return {
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and (inspect.isfunction(value) or inspect.isclass(value))
        and value.__module__ == module.__name__
    }


def parameters(obj) -> list[tuple[str, object, object]]:
    # names, kinds and defaults; annotations may differ (bnbx annotates everything)
    return [(p.name, p.kind, p.default) for p in inspect.signature(obj).parameters.values()]


def test_every_storage_name_of_bitsandbytes_exists_in_bnbx():
    theirs = public_callables(bnb)
    assert STORAGE_NAMES <= theirs  # the lists above describe this bitsandbytes version
    new = theirs - STORAGE_NAMES - NOT_IN_SCOPE
    assert not new, f"bitsandbytes has new public names {sorted(new)}: decide whether they are in scope"
    assert all(hasattr(F, name) for name in STORAGE_NAMES)


@pytest.mark.parametrize("name", sorted(STORAGE_NAMES))
def test_signature_equals_bitsandbytes(name):
    ours, theirs = getattr(F, name), getattr(bnb, name)
    assert parameters(ours) == parameters(theirs)


def test_defaults_give_the_same_state_as_bitsandbytes():
    A = torch.randn(256, 64)
    _, state = F.quantize_4bit(A)
    _, their_state = bnb.quantize_4bit(A)
    assert (state.quant_type, state.blocksize) == (their_state.quant_type, their_state.blocksize) == ("fp4", 64)
    assert torch.equal(state.absmax, their_state.absmax)
    codes, state = F.quantize_blockwise(A)
    their_codes, their_state = bnb.quantize_blockwise(A)
    assert state.blocksize == their_state.blocksize == 4096
    assert torch.equal(state.code, their_state.code) and torch.equal(state.absmax, their_state.absmax)


# --- code maps ------------------------------------------------------------------------------------------------


def dynamic_args():
    for signed in (True, False):
        for total in range(2, 9):
            for exponent in range(1, total):
                if signed or exponent == total - 1:
                    yield signed, exponent, total


def fp8_args():
    for signed in (True, False):
        for total in range(2, 9):
            for exponent in range(1, total + 1):
                precision = total - exponent - int(signed)
                if precision >= 0:
                    yield signed, exponent, precision, total


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


def test_code_maps_equal_bitsandbytes_value_for_value():
    for args in dynamic_args():
        assert same_bits(F.create_dynamic_map(*args), bnb.create_dynamic_map(*args)), args
    for args in fp8_args():
        assert same_bits(F.create_fp8_map(*args), bnb.create_fp8_map(*args)), args
    for signed in (True, False):
        for total in range(1, 9):
            for add_zero in (True, False):
                args = (signed, total, add_zero)
                assert same_bits(F.create_linear_map(*args), bnb.create_linear_map(*args)), args
    assert same_bits(F.create_dynamic_map(), bnb.create_dynamic_map())


def test_normal_map_holds_the_nf4_values():
    values = F.create_normal_map()
    assert values.numel() == 256 and bool((values[1:] >= values[:-1]).all())
    assert torch.equal(values.unique(), code_table_ref("nf4").unique())


@pytest.mark.parametrize("args", [(0.9677083, True), (0.9677083, False), (0.99, True), (0.8, False)], ids=str)
def test_normal_map_equals_bitsandbytes(args):
    pytest.importorskip("scipy", reason="bitsandbytes' create_normal_map needs SciPy")
    assert same_bits(F.create_normal_map(*args), bnb.create_normal_map(*args))


@pytest.mark.parametrize("typename", ["nf4", "fp4", "af4"])
def test_get_4bit_type_equals_bitsandbytes(typename):
    assert same_bits(F.get_4bit_type(typename, "cpu"), bnb.get_4bit_type(typename, "cpu"))


def test_get_4bit_type_int4():
    # bitsandbytes 0.50.2 builds this table from ints and fails dividing it in place; bnbx returns it
    expected = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0, 0, -1, -2, -3, -4, -5, -6, -7], dtype=torch.float32) / 7
    assert same_bits(F.get_4bit_type("int4", "cpu"), expected)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: F.create_dynamic_map(True, 8, 8), "max_exponent_bits must be an integer from 1 to 7"),
        (lambda: F.create_dynamic_map(False, 3, 8), "an unsigned map needs max_exponent_bits"),
        (lambda: F.create_dynamic_map(True, 7, 9), "total_bits must be an integer from 2 to 8"),
        (lambda: F.create_fp8_map(True, 4, 4, 8), "must equal total_bits"),
        (lambda: F.create_linear_map(True, 0), "total_bits must be an integer from 1 to 8"),
        (lambda: F.create_normal_map(1.5), "offset must be a number between 0.5 and 1"),
        (lambda: F.get_4bit_type("af4", "cpu", blocksize=128), "'af4' is defined for blocksize 64 only"),
        (lambda: F.get_4bit_type("nf3", "cpu"), "typename must be"),
    ],
)
def test_map_builders_reject_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# few-bit maps pad with repeated zeros; quantize_blockwise takes them (bitsandbytes' few-bit linear maps are
# not sorted and are rejected, see test_unsorted_code_is_rejected)
FEW_BIT_CODES = {
    "dynamic4": lambda: F.create_dynamic_map(True, 3, 4),
    "dynamic2": lambda: F.create_dynamic_map(True, 1, 2),
    "unsigned_dynamic": lambda: F.create_dynamic_map(False),
    "fp8_e4m3": lambda: F.create_fp8_map(True, 4, 3, 8),
    "fp4_e2m1": lambda: F.create_fp8_map(True, 2, 1, 4),
    "linear8": lambda: F.create_linear_map(True, 8),
    "normal": lambda: F.create_normal_map(),
}


@pytest.mark.parametrize("name", sorted(FEW_BIT_CODES))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_custom_codes_match_the_reference(name, dtype):
    code = FEW_BIT_CODES[name]()
    A = torch.randn(3, 333, dtype=dtype)
    if name == "unsigned_dynamic":
        A = A.abs()
    codes, state = F.quantize_blockwise(A, code=code, blocksize=128)
    expected_codes, expected_absmax = quantize_blockwise_ref(A, code, 128)
    assert torch.equal(codes, expected_codes) and torch.equal(state.absmax, expected_absmax)
    out = F.dequantize_blockwise(codes, state)
    assert torch.equal(out, dequantize_blockwise_ref(codes, expected_absmax, code, 128, dtype))


@pytest.mark.parametrize("signed", [True, False])
def test_unsorted_code_is_rejected(signed):
    # bitsandbytes' few-bit linear maps put the zero padding in the middle: unsigned, after values up to
    # 0.47; signed, before linspace's -3e-8. Codes are indices, so bnbx cannot sort them; it refuses them.
    code = F.create_linear_map(signed=signed, total_bits=3)
    with pytest.raises(ValueError, match="code must be sorted"):
        F.quantize_blockwise(torch.randn(64), code=code, blocksize=64)


# --- blocksizes ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("blocksize", [8192, 16384])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_large_8bit_blocks_match_reference_and_bitsandbytes(blocksize, dtype):
    A = torch.randn(2 * blocksize + 77, dtype=dtype)
    code = F.create_dynamic_map()
    codes, state = F.quantize_blockwise(A, blocksize=blocksize)
    expected_codes, expected_absmax = quantize_blockwise_ref(A, code, blocksize)
    assert torch.equal(codes, expected_codes) and torch.equal(state.absmax, expected_absmax)
    their_codes, their_state = bnb.quantize_blockwise(A, blocksize=blocksize)
    assert torch.equal(state.absmax, their_state.absmax)
    # bitsandbytes' CPU path rounds through a lookup table: its codes differ in rare near-tie elements
    assert (codes != their_codes).float().mean() < 0.01
    out = F.dequantize_blockwise(codes, state)
    assert torch.equal(out, bnb.dequantize_blockwise(codes, their_state))


def test_large_8bit_blocks_pass_opcheck():
    A, code = torch.randn(3, 16384 + 5), F.create_dynamic_map()
    torch.library.opcheck(torch.ops.bnbx.quantize_blockwise, (A, code, 16384))
    codes, absmax = torch.ops.bnbx.quantize_blockwise(A, code, 16384)
    torch.library.opcheck(torch.ops.bnbx.dequantize_blockwise, (codes, absmax, code, 16384, torch.bfloat16))


def test_blocksize_sets():
    A = torch.randn(100)
    for blocksize in (16, 48, 32768):
        with pytest.raises(ValueError, match="blocksize must be a power of two from 32 to 16384"):
            F.quantize_blockwise(A, blocksize=blocksize)
    for blocksize in (16, 8192):
        with pytest.raises(ValueError, match="blocksize must be a power of two from 32 to 4096"):
            F.quantize_4bit(A, blocksize=blocksize)
    with pytest.raises(TypeError, match="blocksize must be an int"):
        F.quantize_4bit(A, blocksize=64.0)


# --- bitsandbytes' out= / absmax= arguments --------------------------------------------------------------------


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_out_and_absmax_arguments_receive_the_results(nested):
    A = torch.randn(33, 65)
    packed, state = F.quantize_4bit(A, compress_statistics=nested)
    out, absmax = torch.empty_like(packed), torch.empty_like(state.absmax)
    packed2, state2 = F.quantize_4bit(A, absmax=absmax, out=out, compress_statistics=nested)
    assert packed2 is out and state2.absmax is absmax
    assert torch.equal(out, packed) and torch.equal(absmax, state.absmax)
    codes, state = F.quantize_blockwise(A, blocksize=64, nested=nested)
    out, absmax = torch.empty_like(codes), torch.empty_like(state.absmax)
    codes2, state2 = F.quantize_blockwise(A, absmax=absmax, out=out, blocksize=64, nested=nested)
    assert codes2 is out and torch.equal(out, codes) and torch.equal(state2.absmax, state.absmax)
    with pytest.raises(ValueError, match="out must have shape"):
        F.quantize_4bit(A, out=torch.empty(3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="absmax must have shape"):
        F.quantize_blockwise(A, absmax=torch.empty(2, dtype=torch.float16))
    with pytest.raises(ValueError, match="out must have shape"):
        F.dequantize_blockwise(codes, state, out=torch.empty(3))


# --- QuantState round trips ----------------------------------------------------------------------------------


def make_state(kind: str, nested: bool, dtype=torch.bfloat16):
    A = torch.randn(37, 70, dtype=dtype)
    if kind in ("nf4", "fp4"):
        packed, state = F.quantize_4bit(A, quant_type=kind, compress_statistics=nested)
        return packed, state, lambda s: F.dequantize_4bit(packed, s)
    code = {"dynamic": None, "fp8": F.create_fp8_map(True, 4, 3, 8), "dynamic3": F.create_dynamic_map(True, 2, 3)}
    codes, state = F.quantize_blockwise(A, code=code[kind], blocksize=256, nested=nested)
    return codes, state, lambda s: F.dequantize_blockwise(codes, s)


KINDS = ["nf4", "fp4", "dynamic", "fp8", "dynamic3"]


@pytest.mark.parametrize("packed_form", [False, True], ids=["dict", "packed"])
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("kind", KINDS)
def test_round_trip(kind, nested, packed_form):
    _, state, decode = make_state(kind, nested)
    items = {f"w.{key}": value for key, value in state.as_dict(packed=packed_form).items()}
    if packed_form:
        assert all(isinstance(value, torch.Tensor) for value in items.values())
        key = f"w.quant_state.bitsandbytes__{state.quant_type}"
        assert json.loads(bytes(items[key].tolist()))["quant_type"] == state.quant_type
    loaded = QuantState.from_dict(items)
    assert loaded == state
    assert torch.equal(decode(loaded), decode(state))


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_bitsandbytes_8bit_state_dicts_load(nested):
    # bitsandbytes writes 8-bit states with quant_type None and shape None, unpacked even for packed=True
    A = torch.randn(3000)
    codes, their_state = bnb.quantize_blockwise(A, blocksize=512, nested=nested)
    items = their_state.as_dict(packed=True)
    assert items["quant_type"] is None and items["shape"] is None
    loaded = QuantState.from_dict(dict(items))
    assert loaded.shape is None and loaded.quant_type == "dynamic" and loaded.nested == nested
    assert torch.equal(F.dequantize_blockwise(codes, loaded), bnb.dequantize_blockwise(codes, their_state))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_bitsandbytes_quant_state_objects_are_accepted(quant_type, nested):
    A = torch.randn(64, 128)
    packed, their_state = bnb.quantize_4bit(A, quant_type=quant_type, compress_statistics=nested)
    expected = bnb.dequantize_4bit(packed, their_state)
    assert torch.equal(F.dequantize_4bit(packed, their_state), expected)
    typed = F.dequantize_nf4 if quant_type == "nf4" else F.dequantize_fp4
    assert torch.equal(typed(packed, their_state), expected)
    converted = QuantState.from_bitsandbytes(their_state)
    assert isinstance(converted, QuantState) and converted.nested == nested
    assert torch.equal(F.dequantize_4bit(packed, converted), expected)
    codes, their_state8 = bnb.quantize_blockwise(A, blocksize=256, nested=nested)
    assert torch.equal(F.dequantize_blockwise(codes, their_state8), bnb.dequantize_blockwise(codes, their_state8))


def test_from_bitsandbytes_rejects_other_objects():
    with pytest.raises(TypeError, match="expected a bitsandbytes QuantState"):
        QuantState.from_bitsandbytes(object())
    _, their_state = bnb.quantize_4bit(torch.randn(64))
    their_state.dtype = None  # a hand-built state with a missing field
    with pytest.raises(ValueError, match="dtype must be one of"):
        F.dequantize_4bit(torch.zeros(32, 1, dtype=torch.uint8), their_state)


# --- strict validation of codes ---------------------------------------------------------------------------------


def corrupt(values: torch.Tensor, how: str) -> torch.Tensor:
    values = values.clone()
    if how == "unsorted":
        values[10], values[20] = values[20].item(), values[10].item()
    elif how == "nan":
        values[5] = float("nan")
    elif how == "inf":
        values[5] = float("inf")
    elif how == "above_one":
        values[-1] = 1.5
    elif how == "short":
        values = values[:255]
    elif how == "fp16":
        values = values.half()
    return values


@pytest.mark.parametrize("how", ["unsorted", "nan", "inf", "above_one", "short", "fp16"])
@pytest.mark.parametrize("key", ["quant_map", "nested_quant_map"])
def test_bad_8bit_codes_are_rejected_with_the_key_named(how, key):
    _, state, _ = make_state("dynamic", nested=True)
    items = state.as_dict(packed=True)
    items[key] = corrupt(items[key], how)
    with pytest.raises(ValueError, match=key):
        QuantState.from_dict(items)


def test_bad_8bit_metadata_is_rejected():
    _, state, _ = make_state("dynamic", nested=False)
    items = state.as_dict()
    for key, value, match in [
        ("blocksize", 48, "blocksize must be one of"),
        ("blocksize", 32768, "blocksize must be one of"),
        ("quant_type", "int8", "quant_type must be one of"),
        ("shape", [10, 10], "absmax must hold"),
        ("dtype", "float64", "dtype must be one of"),
    ]:
        with pytest.raises(ValueError, match=match):
            QuantState.from_dict({**items, key: value})
    with pytest.raises(ValueError, match="absmax must be 1-D"):
        QuantState.from_dict({**items, "shape": None, "absmax": state.absmax.reshape(1, -1)})
    with pytest.raises(ValueError, match="quant_map is not the standard nf4 table"):
        QuantState.from_dict({**items, "quant_type": "nf4", "blocksize": 64, "quant_map": state.code[:16]})
