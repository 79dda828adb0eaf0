"""Storage formats: code tables, code-map builders, allowed blocksizes and dtype names.

A leaf module: it imports nothing from bnbx, so ``_ops.py`` (fake kernels), ``quant_state.py`` and
``functional.py`` (and later ``nn/``, ``qat/``, ...) can all import it without a cycle. The C++ side keeps the
same facts in ``csrc/common/formats.h``.

The map builders reproduce bitsandbytes' ``create_*_map`` functions value for value (same signatures and
defaults; ``tests/test_parity.py`` compares them with bitsandbytes where it is installed). They return fp32 CPU
tensors; callers move them.
"""

from __future__ import annotations

import itertools

import torch

# --- dtypes ----------------------------------------------------------------------------------------------------

SUPPORTED_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
QUANT_STORAGES = (torch.uint8, torch.int8, torch.float16, torch.bfloat16, torch.float32)
# dtype names as bitsandbytes writes them in checkpoints, mapped through a fixed table (never getattr(torch, ...)).
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"float16"`` (the spelling of errors and checkpoints)."""
    return str(dtype).removeprefix("torch.")


# --- blocksizes and types --------------------------------------------------------------------------------------

BLOCKSIZES = tuple(2**i for i in range(5, 13))  # 4-bit: 32 .. 4096, as bitsandbytes
BLOCKSIZES_8BIT = tuple(2**i for i in range(5, 15))  # 8-bit blockwise: 32 .. 16384
QUANT_TYPES = ("nf4", "fp4")
BLOCKWISE_QUANT_TYPE = "dynamic"  # bnbx's quant_type of an 8-bit blockwise state (bitsandbytes leaves it None)
NESTED_BLOCKSIZE = 256  # double quantization of 4-bit absmax values (QLoRA)
DYNAMIC_MAP_SIZE = 256  # values in an 8-bit code
FOUR_BIT_CODE_SIZE = 16  # values in a 4-bit code

# --- 4-bit tables ----------------------------------------------------------------------------------------------

# NF4 by nibble value: QLoRA's normal-float quantiles normalised to [-1, 1] (create_normal_map's 16 values).
NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)  # fmt: skip
# FP4 by nibble value before normalisation (bit 3 = sign); stored divided by 12 in fp32. Code 8 (sign bit, zero
# magnitude) is stored as +0.0, as bitsandbytes writes it in quant_map.
FP4_RAW = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)
# Further 4-bit tables bitsandbytes' get_4bit_type offers (no bnbx kernel decodes them).
INT4_RAW = (7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0)
AF4_BS64 = (
    1.0, 0.72424863, 0.55496234, 0.42563882, 0.31675666, 0.21961274, 0.12934483, 0.04273164, 0.0,
    -0.04934812, -0.14982478, -0.25607552, -0.3736951, -0.51243739, -0.69441008, -1.0,
)  # fmt: skip


def four_bit_table(typename: str, blocksize: int = 64) -> torch.Tensor:
    """fp32 ``[16]`` table by nibble value, normalised by its largest magnitude: nf4, fp4, int4, af4 (bs 64)."""
    if typename == "nf4":
        raw = NF4_VALUES
    elif typename == "fp4":
        raw = FP4_RAW
    elif typename == "int4":
        raw = INT4_RAW
    elif typename == "af4":
        if blocksize != 64:
            raise ValueError(f"get_4bit_type: 'af4' is defined for blocksize 64 only, got {blocksize!r}")
        raw = AF4_BS64
    else:
        raise ValueError(f"get_4bit_type: typename must be 'nf4', 'fp4', 'int4' or 'af4', got {typename!r}")
    table = torch.tensor(raw, dtype=torch.float32)
    return table / table.abs().max()


def canonical_code(quant_type: str) -> torch.Tensor:
    """The fp32 table of a 4-bit type as bitsandbytes stores it in ``quant_map`` (``[16]``, by nibble)."""
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    return four_bit_table(quant_type)


# --- code-map builders (bitsandbytes' signatures, defaults and values) -----------------------------------------


def _check_int(op: str, name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{op}: {name} must be an integer from {low} to {high}, got {value!r}")
    return value


def create_linear_map(signed: bool = True, total_bits: int = 8, add_zero: bool = True) -> torch.Tensor:
    """256 evenly spaced values in [-1, 1] (``signed``) or [0, 1]; fewer bits pad the middle with zeros.

    As in bitsandbytes, a signed map with a zero drops one value to centre on 0, and an unsigned few-bit map
    is not sorted (its zero padding sits in the middle), so :func:`quantize_blockwise` rejects it.
    """
    total_bits = _check_int("create_linear_map", "total_bits", total_bits, 1, 8)
    count = 2**total_bits
    if signed and (add_zero or total_bits < 8):
        count -= 1
    values = torch.linspace(-1.0 if signed else 0.0, 1.0, count, dtype=torch.float32)
    gap = 256 - count
    if gap == 0:
        return values
    half = count // 2
    return torch.cat([values[:half], torch.zeros(gap, dtype=torch.float32), values[half:]])


def create_normal_map(offset: float = 0.9677083, use_extra_value: bool = True) -> torch.Tensor:
    """The NF4 construction: normal quantiles (8 positive and 7 negative with ``use_extra_value``, else 7 and
    7) between ``offset`` and 0.5, the rest zeros, sorted and divided by the largest; 256 fp32 values.

    Quantiles come from ``torch.special.ndtri`` in float64 (bitsandbytes uses SciPy, not needed here).
    """
    if isinstance(offset, bool) or not isinstance(offset, (int, float)) or not 0.5 < offset < 1.0:
        raise ValueError(f"create_normal_map: offset must be a number between 0.5 and 1 (exclusive), got {offset!r}")

    def quantiles(points: int) -> torch.Tensor:
        return torch.special.ndtri(torch.linspace(offset, 0.5, points, dtype=torch.float32)[:-1].double())

    positive = quantiles(9 if use_extra_value else 8)
    negative = -quantiles(8)
    zeros = torch.zeros(256 - positive.numel() - negative.numel(), dtype=torch.float64)
    values = torch.cat([positive, zeros, negative]).float().sort().values
    return values / values.max()


def create_fp8_map(
    signed: bool = True, exponent_bits: int = 5, precision_bits: int = 2, total_bits: int = 8
) -> torch.Tensor:
    """A small-float map (bitsandbytes' exponent bias and layout) normalised to [-1, 1], padded with zeros to
    256 values. ``signed + exponent_bits + precision_bits`` must equal ``total_bits``; e.g. FP4 is
    ``create_fp8_map(True, 2, 1, 4)``."""
    op = "create_fp8_map"
    total_bits = _check_int(op, "total_bits", total_bits, 2, 8)
    exponent_bits = _check_int(op, "exponent_bits", exponent_bits, 1, 8)
    precision_bits = _check_int(op, "precision_bits", precision_bits, 0, 7)
    if exponent_bits + precision_bits + (1 if signed else 0) != total_bits:
        raise ValueError(
            f"{op}: signed ({int(bool(signed))}) + exponent_bits ({exponent_bits}) + precision_bits "
            f"({precision_bits}) must equal total_bits ({total_bits})"
        )
    bias = 2 ** (exponent_bits - 1)
    values: list[float] = []
    for exponent in range(2**exponent_bits):
        for bits in itertools.product((0, 1), repeat=precision_bits):
            mantissa = (0.0 if exponent == 0 else 1.0) + sum(bit * 2.0 ** -(i + 1) for i, bit in enumerate(bits))
            # exponent field 0: subnormals scaled by 2^-bias; otherwise 2^-(exponent - bias - 1)
            value = mantissa * 2.0 ** (-bias if exponent == 0 else -(exponent - bias - 1))
            values += [value, -value] if signed else [value]
    values += [0.0] * (256 - len(values))
    code = torch.tensor(sorted(values), dtype=torch.float32)
    return code / code.max()


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """bitsandbytes' dynamic map (Dettmers 2015): for exponent i < ``max_exponent_bits``, the midpoints of an
    even split of [0.1, 1] scaled by 10^(i - max_exponent_bits + 1), both signs when ``signed``; plus 0 and 1;
    padded with zeros to 256 values for ``total_bits`` < 8; sorted fp32."""
    op = "create_dynamic_map"
    total_bits = _check_int(op, "total_bits", total_bits, 2, 8)
    max_exponent_bits = _check_int(op, "max_exponent_bits", max_exponent_bits, 1, total_bits - 1)
    if not signed and max_exponent_bits != total_bits - 1:
        # bitsandbytes' construction only fills 2^total_bits values for this split when unsigned
        raise ValueError(f"{op}: an unsigned map needs max_exponent_bits == total_bits - 1, got {max_exponent_bits}")
    fraction_bits = total_bits - 1 - max_exponent_bits

    def midpoints(count: int) -> torch.Tensor:
        edges = torch.linspace(0.1, 1, count + 1, dtype=torch.float32)
        return (edges[:-1] + edges[1:]) / 2.0

    def add(means: torch.Tensor, scale: float) -> None:
        values.extend((scale * means).tolist())
        if signed:
            values.extend((-scale * means).tolist())

    values: list[float] = []
    for i in range(max_exponent_bits):
        add(midpoints(2 ** (i + fraction_bits + (0 if signed else 1))), 10.0 ** (i - max_exponent_bits + 1))
    extra = 2**fraction_bits - 1  # codes whose exponent bits are all zero, in the largest decade
    if extra > 0:
        add(midpoints(extra), 1.0)
    values += [0.0, 1.0]
    values += [0.0] * (256 - len(values))
    return torch.tensor(sorted(values), dtype=torch.float32)


# Built once at import so torch.compile sees constants; callers copy before handing them out.
DYNAMIC_MAP = create_dynamic_map(signed=True)
UNSIGNED_DYNAMIC_MAP = create_dynamic_map(signed=False)
