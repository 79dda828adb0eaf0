// int8 absmax (symmetric) and zero-point (asymmetric) quantization over contiguous groups, compiled once per
// instruction set (see quantize_int8.h). C++ twin of tests/reference.py::quantize_int8_ref.
#include "isa_unit.h"
#include "quantize_int8.h"

namespace bnbx::cpu {
namespace BNBX_ISA {

#include "simd.h"

// Group parameters and the rounding of one element (Int8Params, int8_params_from_range, int8_code) are
// common/rules.h's, shared with the CUDA kernels.

// Folds in[begin, end) into the running range: low = min(x, low) keeping the earlier value on ties, etc.
template <FloatType kIn>
static inline void int8_range(const void* in, int64_t begin, int64_t end, float* low, float* high, bool* nonfinite) {
  for (int64_t i = begin; i < end; ++i) {
    const float x = load_as_float<kIn>(in, i);
    *nonfinite |= !(std::fabs(x) <= FLT_MAX);
    *low = x < *low ? x : *low;
    *high = x > *high ? x : *high;
  }
}

template <FloatType kIn>
static inline Int8Params int8_group_params(const void* in, int64_t start, int64_t end, bool symmetric) {
  float low = 0.0f, high = 0.0f;  // the range always holds 0, so 0 is exact
  bool bad = false;
  int8_range<kIn>(in, start, end, &low, &high, &bad);
  return int8_params_from_range(low, high, bad, symmetric);
}

// q[begin, end) of one group with its parameters.
template <FloatType kIn>
static inline void quantize_int8_values(const void* in, int64_t begin, int64_t end, const Int8Params& params,
                                        float qmin, int8_t* q) {
  if (params.nonfinite) {
    // NaN/Inf contract: scale NaN, zero point 0, q 0 (x * 0 would still turn a NaN or an Inf into qmin)
    std::fill(q + begin, q + end, int8_t{0});
    return;
  }
  const float zp = static_cast<float>(params.zero_point);
  if (std::isinf(params.inv_scale)) {
    // subnormal scale: 1/scale overflows, so divide instead (exact, slower, rare)
    for (int64_t i = begin; i < end; ++i) {
      q[i] = int8_code(load_as_float<kIn>(in, i) / params.scale, zp, qmin);
    }
    return;
  }
  for (int64_t i = begin; i < end; ++i) {
    q[i] = int8_code(load_as_float<kIn>(in, i) * params.inv_scale, zp, qmin);
  }
}

template <FloatType kIn>
static void quantize_int8_generic(const void* in, int64_t n, int64_t group_size, bool symmetric, int8_t* q,
                                  float* scale, int32_t* zero_point, int64_t group_begin, int64_t group_end) {
  const float qmin = symmetric ? -127.0f : -128.0f;
  for (int64_t group = group_begin; group < group_end; ++group) {
    const int64_t start = group * group_size;
    const int64_t end = std::min(n, start + group_size);
    const Int8Params params = int8_group_params<kIn>(in, start, end, symmetric);
    scale[group] = params.scale;
    zero_point[group] = params.zero_point;
    quantize_int8_values<kIn>(in, start, end, params, qmin, q);
  }
}

// Zero-point rounding can rebuild up to half a step past the original maximum; in fp16 that can pass
// 65504, so fp16 output saturates to its finite range (NaN stays NaN: std::min/max keep their first argument).
template <FloatType kOut>
constexpr float kInt8DequantizeLimit = kOut == FloatType::kFloat16 ? 65504.0f : FLT_MAX;

template <FloatType kOut>
static inline void dequantize_int8_values(const int8_t* q, float group_scale, float zp, int64_t begin, int64_t end,
                                          void* out) {
  constexpr float kLimit = kInt8DequantizeLimit<kOut>;
  for (int64_t i = begin; i < end; ++i) {
    const float value = (static_cast<float>(q[i]) - zp) * group_scale;
    store_from_float<kOut>(out, i, std::max(std::min(value, kLimit), -kLimit));
  }
}

template <FloatType kOut>
static void dequantize_int8_generic(const int8_t* q, const float* scale, const int32_t* zero_point, int64_t n,
                                    int64_t group_size, void* out, int64_t group_begin, int64_t group_end) {
  for (int64_t group = group_begin; group < group_end; ++group) {
    const int64_t start = group * group_size;
    const int64_t end = std::min(n, start + group_size);
    dequantize_int8_values<kOut>(q, scale[group], static_cast<float>(zero_point[group]), start, end, out);
  }
}

// SIMD paths, bit-identical to the loops above:
// - range: min_ps(x, low) is "x < low ? x : low" and max_ps(x, high) "x > high ? x : high", the generic's
//   expressions. The accumulators start at +0 and only take strictly smaller (larger) values, so they hold
//   +0 or values whose bit pattern is fixed by their value: the lane order cannot change the result.
// - values: the same fp32 product, rounding in the current mode (as nearbyint), then min/max in the
//   generic's operand order; dequantize stores with the helpers of simd_avx512.h / simd_avx2.h.
// Non-finite groups, subnormal scales and tails use the loops above.
#if defined(__AVX512F__)
template <FloatType kIn>
static void quantize_int8_simd(const void* in, int64_t n, int64_t group_size, bool symmetric, int8_t* q, float* scale,
                               int32_t* zero_point, int64_t group_begin, int64_t group_end) {
  if (denormals_flushed()) {
    return quantize_int8_generic<kIn>(in, n, group_size, symmetric, q, scale, zero_point, group_begin, group_end);
  }
  const float qmin = symmetric ? -127.0f : -128.0f;
  const __m512i magnitude = _mm512_set1_epi32(0x7fffffff);
  for (int64_t group = group_begin; group < group_end; ++group) {
    const int64_t start = group * group_size;
    const int64_t end = std::min(n, start + group_size);
    __m512 low = _mm512_setzero_ps(), high = _mm512_setzero_ps();
    __m512i worst = _mm512_setzero_si512();
    int64_t i = start;
    for (; i + 16 <= end; i += 16) {
      const __m512 x = load_16_as_float<kIn>(in, i);
      low = _mm512_min_ps(x, low);
      high = _mm512_max_ps(x, high);
      worst = _mm512_max_epu32(worst, _mm512_and_si512(_mm512_castps_si512(x), magnitude));
    }
    float group_low = _mm512_reduce_min_ps(low), group_high = _mm512_reduce_max_ps(high);
    bool nonfinite = _mm512_reduce_max_epu32(worst) > 0x7f7fffffu;
    int8_range<kIn>(in, i, end, &group_low, &group_high, &nonfinite);
    const Int8Params params = int8_params_from_range(group_low, group_high, nonfinite, symmetric);
    scale[group] = params.scale;
    zero_point[group] = params.zero_point;
    i = start;
    if (!params.nonfinite && !std::isinf(params.inv_scale)) {
      const __m512 inv_scale = _mm512_set1_ps(params.inv_scale);
      const __m512 zp = _mm512_set1_ps(static_cast<float>(params.zero_point));
      const __m512 lowest = _mm512_set1_ps(qmin), highest = _mm512_set1_ps(127.0f);
      for (; i + 16 <= end; i += 16) {
        const __m512 rounded = _mm512_roundscale_ps(_mm512_mul_ps(load_16_as_float<kIn>(in, i), inv_scale),
                                                    _MM_FROUND_CUR_DIRECTION | _MM_FROUND_NO_EXC);
        const __m512 clamped = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(rounded, zp), lowest), highest);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i), _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(clamped)));
      }
    }
    quantize_int8_values<kIn>(in, i, end, params, qmin, q);
  }
}

template <FloatType kOut>
static void dequantize_int8_simd(const int8_t* q, const float* scale, const int32_t* zero_point, int64_t n,
                                 int64_t group_size, void* out, int64_t group_begin, int64_t group_end) {
  if (denormals_flushed()) {
    return dequantize_int8_generic<kOut>(q, scale, zero_point, n, group_size, out, group_begin, group_end);
  }
  const __m512 limit = _mm512_set1_ps(kInt8DequantizeLimit<kOut>),
               negative_limit = _mm512_set1_ps(-kInt8DequantizeLimit<kOut>);
  for (int64_t group = group_begin; group < group_end; ++group) {
    const int64_t start = group * group_size;
    const int64_t end = std::min(n, start + group_size);
    const float zp = static_cast<float>(zero_point[group]);
    const __m512 group_scale = _mm512_set1_ps(scale[group]), zp_vector = _mm512_set1_ps(zp);
    int64_t i = start;
    for (; i + 16 <= end; i += 16) {
      const __m512 codes =
          _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + i))));
      const __m512 value = _mm512_mul_ps(_mm512_sub_ps(codes, zp_vector), group_scale);
      // std::min(value, limit) = limit < value ? limit : value; std::max(r, -limit) = -limit > r ? -limit : r
      const __m512 clamped = _mm512_max_ps(negative_limit, _mm512_min_ps(limit, value));
      store_16_from_float<kOut>(out, i, clamped);
    }
    dequantize_int8_values<kOut>(q, scale[group], zp, i, end, out);
  }
}
#elif defined(__AVX2__)
template <FloatType kIn>
static void quantize_int8_simd(const void* in, int64_t n, int64_t group_size, bool symmetric, int8_t* q, float* scale,
                               int32_t* zero_point, int64_t group_begin, int64_t group_end) {
  if (denormals_flushed()) {
    return quantize_int8_generic<kIn>(in, n, group_size, symmetric, q, scale, zero_point, group_begin, group_end);
  }
  const float qmin = symmetric ? -127.0f : -128.0f;
  const __m256i magnitude = _mm256_set1_epi32(0x7fffffff);
  for (int64_t group = group_begin; group < group_end; ++group) {
    const int64_t start = group * group_size;
    const int64_t end = std::min(n, start + group_size);
    __m256 low = _mm256_setzero_ps(), high = _mm256_setzero_ps();
    __m256i worst = _mm256_setzero_si256();
    int64_t i = start;
    for (; i + 8 <= end; i += 8) {
      const __m256 x = load_8_as_float<kIn>(in, i);
      low = _mm256_min_ps(x, low);
      high = _mm256_max_ps(x, high);
      worst = _mm256_max_epu32(worst, _mm256_and_si256(_mm256_castps_si256(x), magnitude));
    }
    alignas(32) float lows[8], highs[8];
    alignas(32) uint32_t worsts[8];
    _mm256_store_ps(lows, low);
    _mm256_store_ps(highs, high);
    _mm256_store_si256(reinterpret_cast<__m256i*>(worsts), worst);
    float group_low = 0.0f, group_high = 0.0f;
    bool nonfinite = false;
    for (int lane = 0; lane < 8; ++lane) {
      group_low = lows[lane] < group_low ? lows[lane] : group_low;
      group_high = highs[lane] > group_high ? highs[lane] : group_high;
      nonfinite |= worsts[lane] > 0x7f7fffffu;
    }
    int8_range<kIn>(in, i, end, &group_low, &group_high, &nonfinite);
    const Int8Params params = int8_params_from_range(group_low, group_high, nonfinite, symmetric);
    scale[group] = params.scale;
    zero_point[group] = params.zero_point;
    i = start;
    if (!params.nonfinite && !std::isinf(params.inv_scale)) {
      const __m256 inv_scale = _mm256_set1_ps(params.inv_scale);
      const __m256 zp = _mm256_set1_ps(static_cast<float>(params.zero_point));
      const __m256 lowest = _mm256_set1_ps(qmin), highest = _mm256_set1_ps(127.0f);
      for (; i + 16 <= end; i += 16) {
        __m256i values[2];
        for (int half = 0; half < 2; ++half) {
          const __m256 rounded = _mm256_round_ps(_mm256_mul_ps(load_8_as_float<kIn>(in, i + 8 * half), inv_scale),
                                                 _MM_FROUND_CUR_DIRECTION | _MM_FROUND_NO_EXC);
          values[half] = _mm256_cvttps_epi32(_mm256_min_ps(_mm256_max_ps(_mm256_add_ps(rounded, zp), lowest), highest));
        }
        // 16 int32 in [-128, 127] -> 16 int8 (the in-lane packs leave 4-byte groups to reorder)
        const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(values[0], values[1]), _mm256_setzero_si256());
        const __m256i ordered = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i), _mm256_castsi256_si128(ordered));
      }
    }
    quantize_int8_values<kIn>(in, i, end, params, qmin, q);
  }
}

template <FloatType kOut>
static void dequantize_int8_simd(const int8_t* q, const float* scale, const int32_t* zero_point, int64_t n,
                                 int64_t group_size, void* out, int64_t group_begin, int64_t group_end) {
  if (denormals_flushed()) {
    return dequantize_int8_generic<kOut>(q, scale, zero_point, n, group_size, out, group_begin, group_end);
  }
  const __m256 limit = _mm256_set1_ps(kInt8DequantizeLimit<kOut>),
               negative_limit = _mm256_set1_ps(-kInt8DequantizeLimit<kOut>);
  for (int64_t group = group_begin; group < group_end; ++group) {
    const int64_t start = group * group_size;
    const int64_t end = std::min(n, start + group_size);
    const float zp = static_cast<float>(zero_point[group]);
    const __m256 group_scale = _mm256_set1_ps(scale[group]), zp_vector = _mm256_set1_ps(zp);
    int64_t i = start;
    for (; i + 8 <= end; i += 8) {
      const __m256 codes =
          _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + i))));
      const __m256 value = _mm256_mul_ps(_mm256_sub_ps(codes, zp_vector), group_scale);
      // std::min(value, limit) = limit < value ? limit : value; std::max(r, -limit) = -limit > r ? -limit : r
      const __m256 clamped = _mm256_max_ps(negative_limit, _mm256_min_ps(limit, value));
      store_8_from_float<kOut>(out, i, clamped);
    }
    dequantize_int8_values<kOut>(q, scale[group], zp, i, end, out);
  }
}
#endif

#if defined(__AVX512F__) || defined(__AVX2__)
#define BNBX_INT8_KERNEL(name) name##_simd
#else
#define BNBX_INT8_KERNEL(name) name##_generic
#endif

static void quantize_int8(FloatType in_type, const void* in, int64_t n, int64_t group_size, bool symmetric, int8_t* q,
                          float* scale, int32_t* zero_point, int64_t group_begin, int64_t group_end) {
  switch (in_type) {
    case FloatType::kFloat32:
      return BNBX_INT8_KERNEL(quantize_int8)<FloatType::kFloat32>(in, n, group_size, symmetric, q, scale, zero_point,
                                                                  group_begin, group_end);
    case FloatType::kFloat16:
      return BNBX_INT8_KERNEL(quantize_int8)<FloatType::kFloat16>(in, n, group_size, symmetric, q, scale, zero_point,
                                                                  group_begin, group_end);
    case FloatType::kBFloat16:
      return BNBX_INT8_KERNEL(quantize_int8)<FloatType::kBFloat16>(in, n, group_size, symmetric, q, scale, zero_point,
                                                                   group_begin, group_end);
  }
}

static void dequantize_int8(FloatType out_type, const int8_t* q, const float* scale, const int32_t* zero_point,
                            int64_t n, int64_t group_size, void* out, int64_t group_begin, int64_t group_end) {
  switch (out_type) {
    case FloatType::kFloat32:
      return BNBX_INT8_KERNEL(dequantize_int8)<FloatType::kFloat32>(q, scale, zero_point, n, group_size, out,
                                                                    group_begin, group_end);
    case FloatType::kFloat16:
      return BNBX_INT8_KERNEL(dequantize_int8)<FloatType::kFloat16>(q, scale, zero_point, n, group_size, out,
                                                                    group_begin, group_end);
    case FloatType::kBFloat16:
      return BNBX_INT8_KERNEL(dequantize_int8)<FloatType::kBFloat16>(q, scale, zero_point, n, group_size, out,
                                                                     group_begin, group_end);
  }
}

#undef BNBX_INT8_KERNEL

}  // namespace BNBX_ISA

const QuantizeInt8Kernels BNBX_TABLE(quantize_int8) = {BNBX_ISA_NAME, &BNBX_ISA::quantize_int8,
                                                       &BNBX_ISA::dequantize_int8};

}  // namespace bnbx::cpu
