// Per-element and per-block rules shared by every backend: the CPU kernels (each instruction set), the CUDA
// kernels and their host emulation, and fused epilogues of the matmul families. One definition each, so a
// rule can never drift between backends. `static inline` for the reason given in formats.h.
#pragma once

#include <cstdint>

#include "formats.h"

namespace bnbx {

// ceil(a / b) for a >= 0, b > 0, without the overflow of (a + b - 1) / b near INT64_MAX.
BNBX_HOST_DEVICE static inline int64_t ceil_div(int64_t a, int64_t b) { return a / b + (a % b != 0 ? 1 : 0); }

}  // namespace bnbx

// --- integer fake quantization (QAT): one rule for the fake-quant kernels (CPU, CUDA) and the deployable
// int8 format. A group with range [low, high] (both hold 0) on the integer grid [qmin, qmax]:
//   symmetric:  scale = absmax / denominator, zero_point 0. denominator = qmax (restricted range,
//               LLM-QAT's and bnbx int8's +-(2^(b-1)-1)) or (qmax - qmin) / 2 (full range, torchao's).
//   asymmetric: scale = (high - low) / (qmax - qmin), zero_point = clamp(round(qmin - low / scale), qmin, qmax).
//   code q = clamp(round(x * (1 / scale)) + zero_point, qmin, qmax), value (q - zero_point) * scale in fp32.
// Rounding is half to even (the current mode); x / scale is x * (1 / scale), as torch's fake_quantize does;
// a subnormal scale, whose reciprocal overflows, divides instead. With 8 bits these are exactly the rules of
// bnbx.quantize_int8 (csrc/cpu/kernels/quantize_int8_impl.h), which tests/qat holds bit for bit.
namespace bnbx {

struct AffineParams {
  float scale;
  float inv_scale;  // 1 / scale; 0 for a zero-range or non-finite group
  float zero_point;  // an integer in [qmin, qmax]
  bool nonfinite;    // the group holds a NaN or an Inf: every value becomes NaN, as int8 dequantize gives
};

BNBX_HOST_DEVICE static inline float rule_round(float x) {
#if defined(__CUDA_ARCH__)
  return rintf(x);
#else
  return __builtin_nearbyintf(x);
#endif
}

// max/min with std::max/std::min's operand order, so -0.0 / +0.0 ties resolve as the int8 kernels do.
BNBX_HOST_DEVICE static inline float rule_max(float a, float b) { return a < b ? b : a; }
BNBX_HOST_DEVICE static inline float rule_min(float a, float b) { return b < a ? b : a; }

BNBX_HOST_DEVICE static inline AffineParams affine_params(float low, float high, bool nonfinite, bool symmetric,
                                                          float qmin, float qmax, float sym_denominator) {
  if (nonfinite) return {__builtin_nanf(""), 0.0f, 0.0f, true};
  if (symmetric) {
    const float absmax = rule_max(-low, high);
    const float scale = absmax / sym_denominator;
    return {scale, scale == 0.0f ? 0.0f : 1.0f / scale, 0.0f, false};
  }
  const float scale = (high - low) / (qmax - qmin);
  if (scale == 0.0f) return {0.0f, 0.0f, 0.0f, false};
  const float zero_point = rule_min(qmax, rule_max(qmin, rule_round(qmin - low / scale)));
  return {scale, 1.0f / scale, zero_point, false};
}

// The integer code of x (as a float), clamped to [qmin, qmax].
BNBX_HOST_DEVICE static inline float affine_code(float x, const AffineParams& p, float qmin, float qmax) {
  const float scaled = p.inv_scale > 3.4028234663852886e38f ? x / p.scale : x * p.inv_scale;
  return rule_min(qmax, rule_max(qmin, rule_round(scaled) + p.zero_point));
}

// Fake-quantized x in fp32: the dequantized code. fp16 outputs are then clamped to +-65504 by the caller,
// as int8 dequantize does.
BNBX_HOST_DEVICE static inline float affine_fake_quant(float x, const AffineParams& p, float qmin, float qmax) {
  if (p.nonfinite) return p.scale;  // NaN
  return (affine_code(x, p, qmin, qmax) - p.zero_point) * p.scale;
}

}  // namespace bnbx
