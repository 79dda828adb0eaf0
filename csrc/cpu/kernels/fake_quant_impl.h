// Integer fake quantization (QAT), compiled once per instruction set with BNBX_ISA set to scalar, avx2 or
// avx512 (CMakeLists.txt: bnbx_add_cpu_family(fake_quant)). A plain loop, the C++ twin of
// tests/reference_fake_quant.py, and AVX-512 / AVX2 paths that give the same bits:
// - range: min_ps(x, low) is "x < low ? x : low" and max_ps(x, high) "x > high ? x : high", the loop's
//   expressions; the accumulators start at +0 and only take strictly smaller (larger) values, so the lane
//   order cannot change the result (as in quantize_int8_impl.h).
// - apply: the same fp32 product x * inv_scale, rounding in the current mode (as nearbyint), the clamp in
//   std_min/std_max's operand order, one product by the scale, one rounding to the output type (AVX2); the
//   AVX-512 path computes the same bits with the shortcuts described at apply_groups.
// Non-finite groups, subnormal scales, FTZ/DAZ threads and tails use the plain loop.
#include "../cpu_features.h"
#include "isa_unit.h"
#include "fake_quant.h"

namespace bnbx::cpu {
namespace BNBX_ISA {

#include "simd.h"

template <FloatType kType>
static void range_generic(const void* in, int64_t begin, int64_t end, float* low, float* high, bool* nonfinite) {
  float lo = *low, hi = *high;
  bool bad = *nonfinite;
  for (int64_t i = begin; i < end; ++i) {
    const float x = load_as_float<kType>(in, i);
    bad |= !(std::fabs(x) <= FLT_MAX);
    lo = x < lo ? x : lo;
    hi = x > hi ? x : hi;
  }
  *low = lo;
  *high = hi;
  *nonfinite = bad;
}

template <FloatType kType>
static inline float fq_output_limit() {
  return kType == FloatType::kFloat16 ? 65504.0f : FLT_MAX;
}

template <FloatType kType>
static void apply_generic(const void* in, void* out, int64_t begin, int64_t end, const AffineParams& params, float qmin,
                          float qmax, bool /*stream*/ = false) {
  const float limit = fq_output_limit<kType>();
  for (int64_t i = begin; i < end; ++i) {
    const float value = affine_fake_quant(load_as_float<kType>(in, i), params, qmin, qmax);
    store_from_float<kType>(out, i, std::max(std::min(value, limit), -limit));
  }
}

#if defined(__AVX512F__)
#define BNBX_FQ_BF16_TARGET __attribute__((target("avx512bf16,avx512bw,avx512vl,avx512f")))

template <FloatType kType>
static void range_simd(const void* in, int64_t begin, int64_t end, float* low, float* high, bool* nonfinite) {
  if (denormals_flushed()) return range_generic<kType>(in, begin, end, low, high, nonfinite);
  const __m512i magnitude = _mm512_set1_epi32(0x7fffffff);
  __m512 lo = _mm512_setzero_ps(), hi = _mm512_setzero_ps();
  __m512i worst = _mm512_setzero_si512();
  int64_t i = begin;
  if constexpr (kType == FloatType::kBFloat16) {
    // 32 values per load: a dword's high half is the odd value's fp32 bits once the low half is masked off,
    // its low half shifted up the even value's; Inf and NaN are the 16-bit magnitudes from 0x7f80 up
    const __m512i high_half = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
    const __m512i magnitude16 = _mm512_set1_epi16(0x7fff);
    __m512i worst16 = _mm512_setzero_si512();
    for (; i + 32 <= end; i += 32) {
      if (((i - begin) & 63) == 0) prefetch_ahead<kType>(in, i, 64);  // the pass that reads memory (see simd.h)
      const __m512i bits = _mm512_loadu_si512(static_cast<const uint16_t*>(in) + i);
      const __m512 odd = _mm512_castsi512_ps(_mm512_and_si512(bits, high_half));
      const __m512 even = _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16));
      lo = _mm512_min_ps(odd, _mm512_min_ps(even, lo));
      hi = _mm512_max_ps(odd, _mm512_max_ps(even, hi));
      worst16 = _mm512_max_epu16(worst16, _mm512_and_si512(bits, magnitude16));
    }
    *nonfinite |= _mm512_cmpge_epu16_mask(worst16, _mm512_set1_epi16(0x7f80)) != 0;
  }
  for (; i + 16 <= end; i += 16) {
    if (((i - begin) & 63) == 0) prefetch_ahead<kType>(in, i, 64);  // the pass that reads memory (see simd.h)
    const __m512 x = load_16_as_float<kType>(in, i);
    lo = _mm512_min_ps(x, lo);
    hi = _mm512_max_ps(x, hi);
    worst = _mm512_max_epu32(worst, _mm512_and_si512(_mm512_castps_si512(x), magnitude));
  }
  // fold the lanes into the running range with the loop's expressions (order-free, see the header)
  alignas(64) float lows[16], highs[16];
  _mm512_store_ps(lows, lo);
  _mm512_store_ps(highs, hi);
  float l = *low, h = *high;
  for (int lane = 0; lane < 16; ++lane) {
    l = lows[lane] < l ? lows[lane] : l;
    h = highs[lane] > h ? highs[lane] : h;
  }
  *low = l;
  *high = h;
  *nonfinite |= _mm512_reduce_max_epu32(worst) > 0x7f7fffffu;
  range_generic<kType>(in, i, end, low, high, nonfinite);
}

// The loop of apply_simd, with three exact shortcuts of affine_fake_quant (no NaN or Inf reaches it):
// - clamp(round(v) + zp, qmin, qmax) - zp = round(clamp(v, qmin - zp, qmax - zp)) (integer bounds), and that
//   rounding is (v + 1.5 * 2^23) - 1.5 * 2^23 in the current rounding mode (exact for |v| < 2^22); a zero code
//   comes out +0 either way, as rintf(v) + zp does.
// - kClampOutput: the output-type clamp; skipped when no code times the scale can pass it.
// - kNativeBf16: vcvtneps2bf16 rounds to nearest even like bf16_bits_16 but flushes subnormals, so it is used
//   only when the scale is normal (then every nonzero output is at least the scale).
constexpr float kRoundMagic = 12582912.0f;  // 1.5 * 2^23

template <FloatType kType, bool kClampOutput, bool kNativeBf16, bool kStream>
BNBX_FQ_BF16_TARGET static int64_t apply_groups(const void* in, void* out, int64_t i, int64_t end,
                                                const AffineParams& params, float low_code, float high_code) {
  const __m512 inv = _mm512_set1_ps(params.inv_scale), scale = _mm512_set1_ps(params.scale);
  const __m512 lowest = _mm512_set1_ps(low_code), highest = _mm512_set1_ps(high_code);
  const __m512 magic = _mm512_set1_ps(kRoundMagic);
  const __m512 limit = _mm512_set1_ps(fq_output_limit<kType>());
  const __m512 negative_limit = _mm512_set1_ps(-fq_output_limit<kType>());
  for (; i + 16 <= end; i += 16) {
    const __m512 v = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(load_16_as_float<kType>(in, i), inv), lowest), highest);
    __m512 value = _mm512_mul_ps(_mm512_sub_ps(_mm512_add_ps(v, magic), magic), scale);
    if constexpr (kClampOutput) value = _mm512_max_ps(negative_limit, _mm512_min_ps(limit, value));
    if constexpr (kNativeBf16) {
      const __m256i bits = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(value));
      __m256i* to = reinterpret_cast<__m256i*>(static_cast<uint16_t*>(out) + i);
      if constexpr (kStream) {
        _mm256_stream_si256(to, bits);
      } else {
        _mm256_storeu_si256(to, bits);
      }
    } else {
      store_16_from_float<kType, kStream>(out, i, value);
    }
  }
  return i;  // the first element not written
}

// apply_groups in the variant the group allows; returns the first element not written
template <FloatType kType, bool kStream>
static int64_t apply_fast(const void* in, void* out, int64_t i, int64_t end, const AffineParams& params, float low_code,
                          float high_code, bool clamp) {
  static const bool native_bf16 = cpu_has_avx512_bf16();
  if (kType == FloatType::kBFloat16 && native_bf16 && !clamp && params.scale >= FLT_MIN)
    return apply_groups<kType, false, true, kStream>(in, out, i, end, params, low_code, high_code);
  if (clamp) return apply_groups<kType, true, false, kStream>(in, out, i, end, params, low_code, high_code);
  return apply_groups<kType, false, false, kStream>(in, out, i, end, params, low_code, high_code);
}

template <FloatType kType>
static void apply_simd(const void* in, void* out, int64_t begin, int64_t end, const AffineParams& params, float qmin,
                       float qmax, bool stream) {
  int64_t i = begin;
  if (!denormals_flushed() && !params.nonfinite && params.inv_scale <= FLT_MAX) {
    const float low_code = qmin - params.zero_point, high_code = qmax - params.zero_point;
    // the largest |output| before the clamp: the extreme code times the scale (a product rounds monotonically)
    const float extreme = std::max(-low_code, high_code) * params.scale;
    const bool clamp = !(extreme < fq_output_limit<kType>());
    if (stream) {
      const int64_t head = stream_start<kType>(out, i, end);  // the elements before it: plain stores
      apply_generic<kType>(in, out, i, head, params, qmin, qmax);
      i = apply_fast<kType, true>(in, out, head, end, params, low_code, high_code, clamp);
      _mm_sfence();  // streamed stores are weakly ordered: visible before the caller signals the end of its task
    } else {
      i = apply_fast<kType, false>(in, out, i, end, params, low_code, high_code, clamp);
    }
  }
  apply_generic<kType>(in, out, i, end, params, qmin, qmax);
}
#elif defined(__AVX2__)
template <FloatType kType>
static void range_simd(const void* in, int64_t begin, int64_t end, float* low, float* high, bool* nonfinite) {
  if (denormals_flushed()) return range_generic<kType>(in, begin, end, low, high, nonfinite);
  const __m256i magnitude = _mm256_set1_epi32(0x7fffffff);
  __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
  __m256i worst = _mm256_setzero_si256();
  int64_t i = begin;
  for (; i + 8 <= end; i += 8) {
    const __m256 x = load_8_as_float<kType>(in, i);
    lo = _mm256_min_ps(x, lo);
    hi = _mm256_max_ps(x, hi);
    worst = _mm256_max_epu32(worst, _mm256_and_si256(_mm256_castps_si256(x), magnitude));
  }
  alignas(32) float lows[8], highs[8];
  alignas(32) uint32_t worsts[8];
  _mm256_store_ps(lows, lo);
  _mm256_store_ps(highs, hi);
  _mm256_store_si256(reinterpret_cast<__m256i*>(worsts), worst);
  float l = *low, h = *high;
  bool bad = *nonfinite;
  for (int lane = 0; lane < 8; ++lane) {
    l = lows[lane] < l ? lows[lane] : l;
    h = highs[lane] > h ? highs[lane] : h;
    bad |= worsts[lane] > 0x7f7fffffu;
  }
  *low = l;
  *high = h;
  *nonfinite = bad;
  range_generic<kType>(in, i, end, low, high, nonfinite);
}

template <FloatType kType>
static void apply_simd(const void* in, void* out, int64_t begin, int64_t end, const AffineParams& params, float qmin,
                       float qmax, bool /*stream*/) {
  int64_t i = begin;
  if (!denormals_flushed() && !params.nonfinite && params.inv_scale <= FLT_MAX) {
    const __m256 inv = _mm256_set1_ps(params.inv_scale), scale = _mm256_set1_ps(params.scale);
    const __m256 zp = _mm256_set1_ps(params.zero_point);
    const __m256 lowest = _mm256_set1_ps(qmin), highest = _mm256_set1_ps(qmax);
    const __m256 limit = _mm256_set1_ps(fq_output_limit<kType>()),
                 negative_limit = _mm256_set1_ps(-fq_output_limit<kType>());
    for (; i + 8 <= end; i += 8) {
      const __m256 rounded = _mm256_round_ps(_mm256_mul_ps(load_8_as_float<kType>(in, i), inv),
                                             _MM_FROUND_CUR_DIRECTION | _MM_FROUND_NO_EXC);
      const __m256 code = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(rounded, zp), lowest), highest);
      const __m256 value = _mm256_mul_ps(_mm256_sub_ps(code, zp), scale);
      store_8_from_float<kType>(out, i, _mm256_max_ps(negative_limit, _mm256_min_ps(limit, value)));
    }
  }
  apply_generic<kType>(in, out, i, end, params, qmin, qmax);
}
#endif

#if defined(__AVX512F__) || defined(__AVX2__)
#define BNBX_FQ_KERNEL(name) name##_simd
#else
#define BNBX_FQ_KERNEL(name) name##_generic
#endif

static void range(FloatType type, const void* in, int64_t begin, int64_t end, float* low, float* high,
                  bool* nonfinite) {
  switch (type) {
    case FloatType::kFloat32:
      return BNBX_FQ_KERNEL(range)<FloatType::kFloat32>(in, begin, end, low, high, nonfinite);
    case FloatType::kFloat16:
      return BNBX_FQ_KERNEL(range)<FloatType::kFloat16>(in, begin, end, low, high, nonfinite);
    case FloatType::kBFloat16:
      return BNBX_FQ_KERNEL(range)<FloatType::kBFloat16>(in, begin, end, low, high, nonfinite);
  }
}

static void apply(FloatType type, const void* in, void* out, int64_t begin, int64_t end, const AffineParams& params,
                  float qmin, float qmax, bool stream) {
  switch (type) {
    case FloatType::kFloat32:
      return BNBX_FQ_KERNEL(apply)<FloatType::kFloat32>(in, out, begin, end, params, qmin, qmax, stream);
    case FloatType::kFloat16:
      return BNBX_FQ_KERNEL(apply)<FloatType::kFloat16>(in, out, begin, end, params, qmin, qmax, stream);
    case FloatType::kBFloat16:
      return BNBX_FQ_KERNEL(apply)<FloatType::kBFloat16>(in, out, begin, end, params, qmin, qmax, stream);
  }
}

#undef BNBX_FQ_KERNEL

}  // namespace BNBX_ISA

const FakeQuantKernels BNBX_TABLE(fake_quant) = {BNBX_ISA_NAME, &BNBX_ISA::range, &BNBX_ISA::apply};

}  // namespace bnbx::cpu
