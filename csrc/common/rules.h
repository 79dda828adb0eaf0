// Per-element and per-block rules shared by every backend: the CPU kernels (each instruction set), the CUDA
// kernels and their host emulation, and fused epilogues of the matmul families. One definition each, so a
// rule can never drift between backends. `static inline` for the reason given in formats.h.
//
// Exactness: every function here is plain fp32 arithmetic with one rounding per operation. The CPU units
// compile with -ffp-contract=off and CUDA with -fmad=false, so no a * b + c is ever fused, and neither
// side uses fast-math: both give the same bits.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <limits>

#include "formats.h"

namespace bnbx {

// ceil(a / b) for a >= 0, b > 0, without the overflow of (a + b - 1) / b near INT64_MAX.
BNBX_HOST_DEVICE static inline int64_t ceil_div(int64_t a, int64_t b) { return a / b + (a % b != 0 ? 1 : 0); }

// std::max / std::min as the C++ library defines them: (a < b) ? b : a and (b < a) ? b : a. Written out
// because fmaxf/fminf order -0.0 and +0.0 and treat NaN differently, and the stored bits must match.
BNBX_HOST_DEVICE static inline float std_max(float a, float b) { return a < b ? b : a; }
BNBX_HOST_DEVICE static inline float std_min(float a, float b) { return b < a ? b : a; }

// --- 4-bit and 8-bit blockwise: the block scale -------------------------------------------------------------

// Values are scaled as (x * prescale) * inv_absmax, a reciprocal as bitsandbytes' CUDA kernels do. A block
// whose absmax is subnormal would overflow the reciprocal, so both sides are first multiplied by 2^64 (exact:
// |x| <= absmax < FLT_MIN, and 2^64 is a power of two). absmax == 0 gives a factor of 0, so an all-zero block
// stores the code of 0.
struct BlockScale {
  float prescale;    // 1, or 2^64 for a subnormal absmax
  float inv_absmax;  // 1 / (absmax * prescale), 0 when absmax == 0
};

constexpr float kSubnormalPrescale = 18446744073709551616.0f;  // 2^64

BNBX_HOST_DEVICE static inline BlockScale block_scale(float absmax) {
  if (absmax == 0.0f) return {1.0f, 0.0f};
  if (absmax < FLT_MIN) return {kSubnormalPrescale, 1.0f / (absmax * kSubnormalPrescale)};
  return {1.0f, 1.0f / absmax};
}

// --- 8-bit blockwise: the code of one scaled value ----------------------------------------------------------

// bitsandbytes' CUDA rule (dQuantize in its kQuantizeBlockwise kernel), which wrote the 8-bit checkpoints in
// the wild: a 7-step binary search over the sorted 256-value code itself, starting at index 127 and moving by
// 64, 32, ..., 1 (x > code[pivot] goes up); it ends on an even pivot p whose neighbours p - 1 and p + 1 were
// the last probes below and above. Then the fp32 midpoint (code[p +- 1] + code[p]) * 0.5f decides: above
// code[p], x > midpoint takes p + 1; at or below it, x < midpoint takes p - 1 (p == 0 keeps 0); an exact tie
// keeps p. So ties go to the even index, not to the lower code as torch.bucketize would.
BNBX_HOST_DEVICE static inline uint8_t dynamic_code_index(const float* code, float x) {
  int pivot = 127;
  for (int step = 64; step > 0; step >>= 1) pivot += x > code[pivot] ? step : -step;
  const float value = code[pivot];
  if (x > value) return static_cast<uint8_t>(x > (code[pivot + 1] + value) * 0.5f ? pivot + 1 : pivot);
  const int lower = pivot == 0 ? 0 : pivot - 1;
  return static_cast<uint8_t>(x < (code[lower] + value) * 0.5f ? lower : pivot);
}

// --- double quantization: the offset ------------------------------------------------------------------------

// The mean of the non-NaN absmax values from their sum (in double) and count, rounded once to fp32; 0 when
// every value is NaN or there are none, and +-FLT_MAX for an infinite mean (torch.nan_to_num's rule).
BNBX_HOST_DEVICE static inline float double_quantize_offset(double sum, int64_t count) {
  if (count == 0) return 0.0f;
  const float mean = static_cast<float>(sum / static_cast<double>(count));
  if (mean != mean) return 0.0f;
  return mean > FLT_MAX ? FLT_MAX : (mean < -FLT_MAX ? -FLT_MAX : mean);
}

// --- int8 groups: scale, zero point, one element --------------------------------------------------------------

// torch's affine convention: x ~ (q - zero_point) * scale.
//   symmetric:  scale = absmax / 127, zero_point = 0, q in [-127, 127]
//   asymmetric: range [min(x, 0), max(x, 0)], scale = range / 255, zero_point = round(-128 - low / scale)
//               clamped to [-128, 127], q in [-128, 127]
// One element: q = clamp(round_half_even(x * inv_scale) + zero_point) with inv_scale = 1 / scale, an fp32
// reciprocal (the rule of torch.fake_quantize_per_tensor_affine and quantize_per_tensor on the CPU), not
// x * (127 / absmax), which differs in the last bit for about a quarter of fp32 absmax values. bitsandbytes'
// LLM.int8() rule, x * (127 / absmax), is a separate op.
struct Int8Params {
  float scale;
  float inv_scale;  // 1 / scale; 0 for an all-zero group and for a non-finite one
  int32_t zero_point;
  bool nonfinite;
};

// Scale and zero point from a group's range [low, high] (both hold 0) and its non-finite flag.
BNBX_HOST_DEVICE static inline Int8Params int8_params_from_range(float low, float high, bool nonfinite,
                                                                 bool symmetric) {
  // NaN/Inf contract: a group holding a NaN or an Inf gets a NaN scale, zero point 0 and codes 0.
  if (nonfinite) return {std::numeric_limits<float>::quiet_NaN(), 0.0f, 0, true};
  if (symmetric) {
    const float absmax = std_max(-low, high);  // -0.0 for an all-zero group
    const float scale = absmax / 127.0f;
    return {scale, scale == 0.0f ? 0.0f : 1.0f / scale, 0, false};
  }
  const float scale = (high - low) / 255.0f;
  if (scale == 0.0f) return {0.0f, 0.0f, 0, false};
  const float zero_point = rintf(-128.0f - low / scale);
  return {scale, 1.0f / scale, static_cast<int32_t>(std_min(127.0f, std_max(-128.0f, zero_point))), false};
}

// One code from x * inv_scale (or x / scale when 1/scale overflows, for a subnormal scale): round half to
// even (the current rounding mode, which is the default), add the zero point, clamp to [qmin, 127].
BNBX_HOST_DEVICE static inline int8_t int8_code(float scaled, float zero_point, float qmin) {
  return static_cast<int8_t>(std_min(127.0f, std_max(qmin, rintf(scaled) + zero_point)));
}

// --- CPU work split ---------------------------------------------------------------------------------------------

// at::parallel_for grain: about 32K elements per task, in whole blocks.
BNBX_HOST_DEVICE static inline int64_t grain_in_blocks(int64_t blocksize) {
  return blocksize >= 32768 ? 1 : 32768 / blocksize;
}

}  // namespace bnbx

// --- integer fake quantization (QAT): one rule for the fake-quant kernels (CPU, CUDA) and the deployable
// int8 format. A group with range [low, high] (both hold 0) on the integer grid [qmin, qmax]:
//   symmetric:  scale = absmax / denominator, zero_point 0. denominator = qmax (restricted range,
//               LLM-QAT's and bnbx int8's +-(2^(b-1)-1)) or (qmax - qmin) / 2 (full range, torchao's).
//   asymmetric: scale = (high - low) / (qmax - qmin), zero_point = clamp(round(qmin - low / scale), qmin, qmax).
//   code q = clamp(round(x * (1 / scale)) + zero_point, qmin, qmax), value (q - zero_point) * scale in fp32.
// Rounding is half to even (the current mode); x / scale is x * (1 / scale), as torch's fake_quantize does;
// a subnormal scale, whose reciprocal overflows, divides instead. With 8 bits these are exactly the rules of
// int8_params_from_range / int8_code above (bnbx.quantize_int8), which tests/qat holds bit for bit.
namespace bnbx {

struct AffineParams {
  float scale;
  float inv_scale;   // 1 / scale; 0 for a zero-range or non-finite group
  float zero_point;  // an integer in [qmin, qmax]
  bool nonfinite;    // the group holds a NaN or an Inf: every value becomes NaN, as int8 dequantize gives
};

// The integer grid of `bits` bits: restricted [-(2^(b-1)-1), 2^(b-1)-1] or full [-2^(b-1), 2^(b-1)-1].
struct FakeQuantGrid {
  float qmin, qmax, sym_denominator;
};

inline FakeQuantGrid fake_quant_grid(int64_t bits, bool symmetric, bool full_range) {
  const float qmax = static_cast<float>((int64_t{1} << (bits - 1)) - 1);
  const float qmin = full_range ? -qmax - 1.0f : -qmax;
  // symmetric full range: torchao's amax / ((qmax - qmin) / 2); restricted: amax / qmax
  return {qmin, qmax, full_range ? (qmax - qmin) / 2.0f : qmax};
}

BNBX_HOST_DEVICE static inline AffineParams affine_params(float low, float high, bool nonfinite, bool symmetric,
                                                          float qmin, float qmax, float sym_denominator) {
  if (nonfinite) return {std::numeric_limits<float>::quiet_NaN(), 0.0f, 0.0f, true};
  if (symmetric) {
    const float absmax = std_max(-low, high);
    const float scale = absmax / sym_denominator;
    return {scale, scale == 0.0f ? 0.0f : 1.0f / scale, 0.0f, false};
  }
  const float scale = (high - low) / (qmax - qmin);
  if (scale == 0.0f) return {0.0f, 0.0f, 0.0f, false};
  const float zero_point = std_min(qmax, std_max(qmin, rintf(qmin - low / scale)));
  return {scale, 1.0f / scale, zero_point, false};
}

// The integer code of x (as a float), clamped to [qmin, qmax].
BNBX_HOST_DEVICE static inline float affine_code(float x, const AffineParams& p, float qmin, float qmax) {
  const float scaled = p.inv_scale > 3.4028234663852886e38f ? x / p.scale : x * p.inv_scale;
  return std_min(qmax, std_max(qmin, rintf(scaled) + p.zero_point));
}

// Fake-quantized x in fp32: the dequantized code. fp16 outputs are then clamped to +-65504 by the caller,
// as int8 dequantize does.
BNBX_HOST_DEVICE static inline float affine_fake_quant(float x, const AffineParams& p, float qmin, float qmax) {
  if (p.nonfinite) return p.scale;  // NaN
  return (affine_code(x, p, qmin, qmax) - p.zero_point) * p.scale;
}

}  // namespace bnbx

// --- LSQ / LSQ+ fake quantization (QAT with a learned scale and offset): one rule for the CPU kernels (every
// instruction set), the CUDA kernels and the fp64 path. The plain-torch formula it reproduces bit for bit is
// tests/reference_fake_quant.py's lsq_torch:
//   v = (x - offset) * inv_scale with inv_scale = 1 / scale (a reciprocal, then a product)
//   out = clamp(round_half_even(v), qmin, qmax) * scale + offset (a product, then a sum: never fused)
// The clamp propagates NaN as torch.clamp does (max(qmin, v) and min(qmax, v) keep a NaN v). Backward, with
// below = v < qmin, above = v > qmax, inside = neither (a NaN v counts as inside, as in the formula):
//   grad_x = grad * inside; d out / d scale = round(v) - v inside, qmin below, qmax above (LSQ);
//   d out / d offset = 1 outside the grid, 0 inside (LSQ+).
namespace bnbx {

BNBX_HOST_DEVICE static inline float round_half_even(float v) { return rintf(v); }
BNBX_HOST_DEVICE static inline double round_half_even(double v) { return rint(v); }

template <typename C>
BNBX_HOST_DEVICE static inline C lsq_clamp(C v, C qmin, C qmax) {
  const C low = qmin > v ? qmin : v;  // a NaN v stays NaN
  return qmax < low ? qmax : low;
}

template <typename C>
BNBX_HOST_DEVICE static inline C lsq_fake_quant(C x, C scale, C inv_scale, C offset, C qmin, C qmax) {
  return lsq_clamp(round_half_even((x - offset) * inv_scale), qmin, qmax) * scale + offset;
}

// One element of the backward: grad_x, and the terms of the scale's and the offset's gradient sums.
template <typename C>
struct LsqGrad {
  C grad_x, d_scale, d_offset;
};

template <typename C>
BNBX_HOST_DEVICE static inline LsqGrad<C> lsq_backward(C x, C grad, C inv_scale, C offset, C qmin, C qmax) {
  const C v = (x - offset) * inv_scale;
  const bool below = v<qmin, above = v> qmax, inside = !(below || above);
  const C slope = inside ? round_half_even(v) - v : (below ? qmin : qmax);
  // products by 1 and 0, not selects, as the formula multiplies: -g * 0 is -0 and an Inf gradient gives NaN
  return {grad * (inside ? C(1) : C(0)), grad * slope, grad * (inside ? C(0) : C(1))};
}

// The sums of a backward segment run over kLsqLanes interleaved partial sums (element i of a segment goes to
// lane i % kLsqLanes) in double, then the lanes are added in order 0..15: every instruction set makes this
// same order, so the gradient's bits depend on neither the instruction set nor the thread count.
constexpr int kLsqLanes = 16;

}  // namespace bnbx
