"""Plain-torch references for every bnbx op: slow, readable, and the definition the kernels are held to.

Each ``*_ref`` follows the rules written in the bnbx docs (and in ``csrc/common/formats.h``), computed with
ordinary fp32 torch operations, so a kernel that matches it bit for bit implements those rules.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch

FLT_MIN = torch.finfo(torch.float32).tiny  # smallest normal fp32
# Half an ulp relative to the value: the most one round-to-nearest to each dtype may cost
HALF_ULP = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
SUBNORMAL_PRESCALE = 2.0**64

# NF4 values by nibble (bitsandbytes get_4bit_type("nf4")); test_formats.py derives them from the normal
# quantiles independently.
NF4_VALUES = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]  # fmt: skip
# Rounding thresholds as bitsandbytes' CUDA decision trees write them (decimal literals compiled straight to
# fp32). NF4: the midpoints of neighbouring codes; an exact midpoint of two floats is a tie between two
# floats, and the literal's last digits decide the side, so these can sit one ulp from fp32(midpoint).
NF4_THRESHOLD_LITERALS = [
    "-0.8480964004993439", "-0.6106329262256622", "-0.4599952697753906", "-0.33967943489551544",
    "-0.23460740596055984", "-0.13791173323988914", "-0.045525018125772476", "0.03979014977812767",
    "0.1202552504837513", "0.2035212516784668", "0.2920137718319893", "0.3893125355243683",
    "0.5016634166240692", "0.6427869200706482", "0.8614784181118011",
]  # fmt: skip
# FP4 magnitude pivots (dQuantizeFP4), within 4e-7 of the exact midpoints.
FP4_PIVOT_LITERALS = ["0.00260417", "0.0859375", "0.20833333", "0.29166667", "0.4166667", "0.583333", "0.8333333"]
FP4_BUCKET_TO_CODE = [0b000, 0b001, 0b110, 0b111, 0b100, 0b101, 0b010, 0b011]
ZERO_CODE = {"nf4": 0b0111, "fp4": 0b0000}


def code_table_ref(quant_type: str) -> torch.Tensor:
    """The 16 decoded values by nibble, fp32."""
    if quant_type == "nf4":
        return torch.tensor(NF4_VALUES, dtype=torch.float32)
    raw = torch.tensor([0, 0.0625, 8, 12, 4, 6, 2, 3], dtype=torch.float32) / 12.0
    return torch.cat([raw, -raw])


def normal_map_ref() -> torch.Tensor:
    """NF4 derived from the normal distribution (QLoRA): 8 positive quantiles from linspace(0.9677083, 0.5, 9),
    7 negative from linspace(0.9677083, 0.5, 8), an exact 0, normalised by the largest; float64."""
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    offset = 0.9677083
    positive = normal.icdf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -normal.icdf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).sort().values
    return values / values.max()


def decimal_to_float32(literal: str) -> float:
    """The fp32 nearest to a decimal string, rounded once (as a C compiler reads ``1.5f``), not via float64."""
    exact = Fraction(literal)
    guess = torch.tensor(float(exact), dtype=torch.float32)
    below, above = torch.nextafter(guess, torch.tensor(-math.inf)), torch.nextafter(guess, torch.tensor(math.inf))
    candidates = [below, guess, above]
    return float(min(candidates, key=lambda c: abs(Fraction(float(c)) - exact)))


def nf4_thresholds_ref() -> torch.Tensor:
    return torch.tensor([decimal_to_float32(t) for t in NF4_THRESHOLD_LITERALS], dtype=torch.float32)


def fp4_pivots_ref() -> torch.Tensor:
    return torch.tensor([decimal_to_float32(t) for t in FP4_PIVOT_LITERALS], dtype=torch.float32)


def dynamic_map_ref() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map: for exponent i = 0..6 the 2^i midpoints of
    linspace(0.1, 1, 2^i + 1), times 10^(i-6), with both signs; plus 0 and 1; sorted."""
    values = []
    for exponent in range(7):
        edges = torch.linspace(0.1, 1, 2**exponent + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        values += ((10 ** (exponent - 6)) * means).tolist() + ((-(10 ** (exponent - 6))) * means).tolist()
    return torch.tensor(sorted(values + [0.0, 1.0]), dtype=torch.float32)


def _blocks(A: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, int]:
    """A flattened to fp32 and zero-padded into rows of blocksize."""
    flat = A.reshape(-1).float()
    n = flat.numel()
    padded = torch.zeros(math.ceil(n / blocksize) * blocksize, dtype=torch.float32)
    padded[:n] = flat
    return padded.view(-1, blocksize), n


def block_scale_ref(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per block: absmax, prescale, 1/(absmax*prescale), non-finite flag (the BlockScale rule)."""
    absmax = blocks.abs().amax(dim=1) if blocks.numel() else torch.zeros(blocks.shape[0])
    nonfinite = ~torch.isfinite(blocks).all(dim=1)
    prescale = torch.where((absmax > 0) & (absmax < FLT_MIN), SUBNORMAL_PRESCALE, 1.0)
    inv = torch.where(absmax == 0, 0.0, 1.0 / (absmax * prescale))
    return absmax, prescale, inv, nonfinite


def _pack_nibbles(codes: torch.Tensor, n: int, zero: int) -> torch.Tensor:
    codes = codes[:n]
    if n % 2:
        codes = torch.cat([codes, torch.tensor([zero], dtype=codes.dtype)])
    codes = codes.to(torch.uint8)
    return (codes[0::2] << 4) | codes[1::2]


def quantize_4bit_ref(A: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns packed uint8 ``[ceil(n/2)]`` and fp32 absmax ``[ceil(n/blocksize)]``."""
    blocks, n = _blocks(A, blocksize)
    absmax, prescale, inv, nonfinite = block_scale_ref(blocks)
    scaled = (blocks * prescale[:, None]) * inv[:, None]
    if quant_type == "nf4":
        codes = (scaled[..., None] > nf4_thresholds_ref()).sum(-1)
    else:
        pivots = fp4_pivots_ref()
        bucket = (scaled.abs()[..., None] > pivots).sum(-1)
        codes = torch.tensor(FP4_BUCKET_TO_CODE)[bucket] | ((scaled < 0).long() << 3)
    codes = torch.where(nonfinite[:, None], ZERO_CODE[quant_type], codes)
    absmax = torch.where(nonfinite, float("nan"), absmax)
    return _pack_nibbles(codes.reshape(-1), n, ZERO_CODE[quant_type]), absmax


def unpack_4bit_ref(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Codes (int64, ``[n]``) from packed bytes of any storage dtype."""
    raw = packed.contiguous().view(-1).view(torch.uint8).long()
    codes = torch.stack([raw >> 4, raw & 0x0F], dim=1).reshape(-1)
    return codes[:n]


def dequantize_4bit_ref(packed, absmax, blocksize, quant_type, shape, dtype) -> torch.Tensor:
    n = math.prod(shape)
    codes = unpack_4bit_ref(packed, n)
    scales = absmax.float().repeat_interleave(blocksize)[:n]
    return (code_table_ref(quant_type)[codes] * scales).to(dtype).reshape(shape)


def dynamic_code_index_ref(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' CUDA 8-bit rule (dQuantize), step by step in fp32 on a flat tensor of scaled values.

    A 7-step binary search over the sorted code itself: pivot 127, then x > code[pivot] moves up by 64, 32, ...,
    1, else down; the last probes below and above are the neighbours of the final pivot p. Then the fp32
    midpoint (neighbour + code[p]) * 0.5 decides: above code[p], x > midpoint takes the upper neighbour; else
    x < midpoint takes the lower one. Every other case (exact ties included) keeps p. Index 255's value and
    index 0's, which the search never probes, are the neighbours of 254 and 0.
    """
    code = code.float()
    x = scaled.float()
    pivot = torch.full_like(x, 127, dtype=torch.long)
    upper_pivot = torch.full_like(pivot, 255)
    lower_pivot = torch.zeros_like(pivot)
    value = code[pivot]
    step = 64
    while step > 0:
        up = x > value
        lower_pivot = torch.where(up, pivot, lower_pivot)
        upper_pivot = torch.where(up, upper_pivot, pivot)
        pivot = torch.where(up, pivot + step, pivot - step)
        value = code[pivot]
        step //= 2
    half = torch.tensor(0.5, dtype=torch.float32)
    upper_mid = (code[upper_pivot] + value) * half
    lower_mid = (code[lower_pivot] + value) * half
    above = x > value
    go_up = torch.where(x > upper_mid, upper_pivot, pivot)
    go_down = torch.where(x < lower_mid, lower_pivot, pivot)
    return torch.where(above, go_up, go_down)


def quantize_blockwise_ref(A: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit: x * (1 / absmax) (the BlockScale rule), coded by bitsandbytes' CUDA search; codes shaped like A."""
    blocks, n = _blocks(A, blocksize)
    absmax, prescale, inv, nonfinite = block_scale_ref(blocks)
    scaled = (blocks * prescale[:, None]) * inv[:, None]
    index = dynamic_code_index_ref(scaled.reshape(-1), code).reshape(scaled.shape)
    zero = int(dynamic_code_index_ref(torch.zeros(1), code))
    index = torch.where(nonfinite[:, None], zero, index)
    absmax = torch.where(nonfinite, float("nan"), absmax)
    return index.reshape(-1)[:n].to(torch.uint8).reshape(A.shape), absmax


def double_quantize_ref(absmax: torch.Tensor, code: torch.Tensor, blocksize: int):
    """(codes, absmax2, offset): offset = the mean of the non-NaN values accumulated in double, rounded once to
    fp32 (0 when there are none, +-FLT_MAX when infinite); then absmax - offset (fp32) 8-bit blockwise."""
    values = absmax.reshape(-1).float()
    valid = ~torch.isnan(values)
    count = int(valid.sum())
    mean = (values[valid].double().sum() / count).float() if count else torch.tensor(0.0)
    offset = torch.nan_to_num(mean, nan=0.0)
    codes, absmax2 = quantize_blockwise_ref((absmax.float() - offset), code, blocksize)
    return codes, absmax2, offset


def dequantize_blockwise_ref(codes, absmax, code, blocksize, dtype) -> torch.Tensor:
    n = codes.numel()
    scales = absmax.float().repeat_interleave(blocksize)[:n]
    return (code[codes.reshape(-1).long()] * scales).to(dtype).reshape(codes.shape)


def quantize_int8_ref(A: torch.Tensor, group_size: int, symmetric: bool):
    """int8 over contiguous groups of the flattened A; returns (q like A, scale [groups], zero_point [groups]).

    The rounding rule is torch's fake-quantize rule: q = round_half_even(x * (1 / scale)) + zero_point, clamped,
    with 1 / scale an fp32 reciprocal (x / scale only when 1 / scale overflows, for a subnormal scale). It is not
    x * (127 / absmax) (bitsandbytes' LLM.int8() rule), whose fp32 multiplier differs in the last bit for about
    a quarter of absmax values.
    """
    groups, n = _blocks(A, group_size)  # zero padding leaves min(x, 0) and max(x, 0) unchanged
    low = groups.amin(dim=1).clamp(max=0) if groups.numel() else torch.zeros(0)
    high = groups.amax(dim=1).clamp(min=0) if groups.numel() else torch.zeros(0)
    nonfinite = ~torch.isfinite(groups).all(dim=1)
    if symmetric:
        scale = torch.maximum(-low, high) / 127.0
        zero_point = torch.zeros_like(scale)
        qmin = -127
    else:
        scale = (high - low) / 255.0
        zero_point = torch.where(scale == 0, 0.0, torch.round(-128.0 - low / scale).clamp(-128, 127))
        qmin = -128
    inv = torch.where(scale == 0, 0.0, 1.0 / scale)
    by_reciprocal = torch.round(groups * inv[:, None])
    by_division = torch.round(groups / scale[:, None])
    q = torch.where(torch.isinf(inv)[:, None], by_division, by_reciprocal) + zero_point[:, None]
    q = q.clamp(qmin, 127)
    q = torch.where(nonfinite[:, None], 0.0, q)
    scale = torch.where(nonfinite, float("nan"), scale)
    zero_point = torch.where(nonfinite, 0.0, zero_point)
    return q.reshape(-1)[:n].to(torch.int8).reshape(A.shape), scale, zero_point.to(torch.int32)


def dequantize_int8_ref(q, scale, zero_point, group_size, dtype) -> torch.Tensor:
    n = q.numel()
    scales = scale.repeat_interleave(group_size)[:n]
    zero_points = zero_point.float().repeat_interleave(group_size)[:n]
    values = (q.reshape(-1).float() - zero_points) * scales
    if dtype == torch.float16:  # saturate to fp16's finite range (zero-point rounding can pass 65504)
        values = values.clamp(-65504.0, 65504.0)
    return values.to(dtype).reshape(q.shape)
