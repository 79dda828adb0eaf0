// LSQ / LSQ+ fake quantization (QAT), compiled once per instruction set with BNBX_ISA set to scalar, avx2 or
// avx512 (CMakeLists.txt: bnbx_add_cpu_family(fake_quant_lsq)). A plain loop, the C++ twin of the plain-torch
// formula (tests/reference_fake_quant.py), and AVX-512 / AVX2 paths that give the same bits:
// - forward: (x - offset) * inv_scale, rounding in the current mode (nearbyint), max_ps(qmin, v) and
//   min_ps(qmax, v) (the second operand is returned for NaN: a NaN stays NaN, as lsq_clamp), then a product
//   and a sum, one rounding to the output type.
// - backward: the same v, ordered compares (NaN is neither below nor above), products by 1/0 as the rule;
//   the sums use kLsqLanes double lanes indexed by the element's position in the range, so the SIMD
//   registers hold exactly the plain loop's lanes, and the lanes are added in order at the end.
// FTZ/DAZ threads and tails use the plain loop.
#include "isa_unit.h"
#include "fake_quant_lsq.h"

namespace bnbx::cpu {
namespace BNBX_ISA {

#include "simd.h"

template <FloatType kType>
static void forward_generic(const void* in, void* out, int64_t begin, int64_t end, const LsqParams& p,
                            bool /*stream*/ = false) {
  for (int64_t i = begin; i < end; ++i) {
    const float x = load_as_float<kType>(in, i);
    store_from_float<kType>(out, i, lsq_fake_quant(x, p.scale, p.inv_scale, p.offset, p.qmin, p.qmax));
  }
}

// Elements [from, end) of the range that starts at `begin`, into the lanes.
template <FloatType kType>
static void backward_lanes(const void* x, const void* grad, void* grad_x, int64_t begin, int64_t from, int64_t end,
                           const LsqParams& p, double* scale_lanes, double* offset_lanes) {
  for (int64_t i = from; i < end; ++i) {
    const LsqGrad<float> g =
        lsq_backward(load_as_float<kType>(x, i), load_as_float<kType>(grad, i), p.inv_scale, p.offset, p.qmin, p.qmax);
    store_from_float<kType>(grad_x, i, g.grad_x);
    const int64_t lane = (i - begin) % kLsqLanes;
    scale_lanes[lane] += static_cast<double>(g.d_scale);
    offset_lanes[lane] += static_cast<double>(g.d_offset);
  }
}

static void sum_lanes(const double* scale_lanes, const double* offset_lanes, double* scale_sum, double* offset_sum) {
  double s = 0.0, o = 0.0;
  for (int lane = 0; lane < kLsqLanes; ++lane) {
    s += scale_lanes[lane];
    o += offset_lanes[lane];
  }
  *scale_sum = s;
  *offset_sum = o;
}

template <FloatType kType>
static void backward_generic(const void* x, const void* grad, void* grad_x, int64_t begin, int64_t end,
                             const LsqParams& p, bool /*stream*/, double* scale_sum, double* offset_sum) {
  double scale_lanes[kLsqLanes] = {}, offset_lanes[kLsqLanes] = {};
  backward_lanes<kType>(x, grad, grad_x, begin, begin, end, p, scale_lanes, offset_lanes);
  sum_lanes(scale_lanes, offset_lanes, scale_sum, offset_sum);
}

#if defined(__AVX512F__)
template <FloatType kType, bool kStream>
static int64_t forward_vectors(const void* in, void* out, int64_t i, int64_t end, const LsqParams& p) {
  const __m512 inv = _mm512_set1_ps(p.inv_scale), scale = _mm512_set1_ps(p.scale);
  const __m512 offset = _mm512_set1_ps(p.offset), qmin = _mm512_set1_ps(p.qmin), qmax = _mm512_set1_ps(p.qmax);
  const int64_t first = i;
  for (; i + 16 <= end; i += 16) {
    if (((i - first) & 63) == 0) prefetch_ahead<kType>(in, i, 64);  // the input streams from memory (simd.h)
    const __m512 v = _mm512_mul_ps(_mm512_sub_ps(load_16_as_float<kType>(in, i), offset), inv);
    const __m512 rounded = _mm512_roundscale_ps(v, _MM_FROUND_CUR_DIRECTION | _MM_FROUND_NO_EXC);
    const __m512 code = _mm512_min_ps(qmax, _mm512_max_ps(qmin, rounded));
    store_16_from_float<kType, kStream>(out, i, _mm512_add_ps(_mm512_mul_ps(code, scale), offset));
  }
  return i;
}

template <FloatType kType>
static void forward_simd(const void* in, void* out, int64_t begin, int64_t end, const LsqParams& p, bool stream) {
  int64_t i = begin;
  if (!denormals_flushed()) {
    if (stream) {
      const int64_t head = stream_start<kType>(out, i, end);  // the elements before it: plain stores
      forward_generic<kType>(in, out, i, head, p);
      i = forward_vectors<kType, true>(in, out, head, end, p);
      _mm_sfence();  // streamed stores are weakly ordered: visible before the caller signals the end of its task
    } else {
      i = forward_vectors<kType, false>(in, out, i, end, p);
    }
  }
  forward_generic<kType>(in, out, i, end, p);
}

static inline __m512d low_half_pd(__m512 v) { return _mm512_cvtps_pd(_mm512_castps512_ps256(v)); }
static inline __m512d high_half_pd(__m512 v) {
  return _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}

template <FloatType kType, bool kStream>
static void backward_vectors(const void* x, const void* grad, void* grad_x, int64_t begin, int64_t end,
                             const LsqParams& p, double* scale_sum, double* offset_sum) {
  const __m512 inv = _mm512_set1_ps(p.inv_scale), offset = _mm512_set1_ps(p.offset);
  const __m512 qmin = _mm512_set1_ps(p.qmin), qmax = _mm512_set1_ps(p.qmax);
  const __m512 one = _mm512_set1_ps(1.0f), zero = _mm512_setzero_ps();
  // lanes 0..7 and 8..15 of the plain loop
  __m512d scale_lo = _mm512_setzero_pd(), scale_hi = _mm512_setzero_pd();
  __m512d offset_lo = _mm512_setzero_pd(), offset_hi = _mm512_setzero_pd();
  int64_t i = begin;
  for (; i + 16 <= end; i += 16) {
    if (((i - begin) & 63) == 0) {  // both inputs stream from memory (simd.h)
      prefetch_ahead<kType>(grad, i, 64);
      prefetch_ahead<kType>(x, i, 64);
    }
    const __m512 g = load_16_as_float<kType>(grad, i);
    const __m512 v = _mm512_mul_ps(_mm512_sub_ps(load_16_as_float<kType>(x, i), offset), inv);
    const __mmask16 below = _mm512_cmp_ps_mask(v, qmin, _CMP_LT_OQ);
    const __mmask16 outside = below | _mm512_cmp_ps_mask(v, qmax, _CMP_GT_OQ);
    const __m512 rounded = _mm512_roundscale_ps(v, _MM_FROUND_CUR_DIRECTION | _MM_FROUND_NO_EXC);
    // mask_blend(k, a, b) is k ? b : a
    const __m512 slope =
        _mm512_mask_blend_ps(outside, _mm512_sub_ps(rounded, v), _mm512_mask_blend_ps(below, qmax, qmin));
    store_16_from_float<kType, kStream>(grad_x, i, _mm512_mul_ps(g, _mm512_mask_blend_ps(outside, one, zero)));
    const __m512 scale_term = _mm512_mul_ps(g, slope);
    const __m512 offset_term = _mm512_mul_ps(g, _mm512_mask_blend_ps(outside, zero, one));
    scale_lo = _mm512_add_pd(scale_lo, low_half_pd(scale_term));
    scale_hi = _mm512_add_pd(scale_hi, high_half_pd(scale_term));
    offset_lo = _mm512_add_pd(offset_lo, low_half_pd(offset_term));
    offset_hi = _mm512_add_pd(offset_hi, high_half_pd(offset_term));
  }
  alignas(64) double scale_lanes[kLsqLanes], offset_lanes[kLsqLanes];
  _mm512_store_pd(scale_lanes, scale_lo);
  _mm512_store_pd(scale_lanes + 8, scale_hi);
  _mm512_store_pd(offset_lanes, offset_lo);
  _mm512_store_pd(offset_lanes + 8, offset_hi);
  backward_lanes<kType>(x, grad, grad_x, begin, i, end, p, scale_lanes, offset_lanes);
  sum_lanes(scale_lanes, offset_lanes, scale_sum, offset_sum);
}

template <FloatType kType>
static void backward_simd(const void* x, const void* grad, void* grad_x, int64_t begin, int64_t end, const LsqParams& p,
                          bool stream, double* scale_sum, double* offset_sum) {
  if (denormals_flushed()) return backward_generic<kType>(x, grad, grad_x, begin, end, p, false, scale_sum, offset_sum);
  // the lanes follow the element order from begin (the sums' bits depend on it), so no unaligned head is
  // peeled off: streamed stores only where grad_x + begin is already aligned for them
  if (stream && stream_start<kType>(grad_x, begin, end) == begin) {
    backward_vectors<kType, true>(x, grad, grad_x, begin, end, p, scale_sum, offset_sum);
    _mm_sfence();  // streamed stores are weakly ordered: visible before the caller signals the end of its task
  } else {
    backward_vectors<kType, false>(x, grad, grad_x, begin, end, p, scale_sum, offset_sum);
  }
}
#elif defined(__AVX2__)
template <FloatType kType>
static void forward_simd(const void* in, void* out, int64_t begin, int64_t end, const LsqParams& p, bool /*stream*/) {
  int64_t i = begin;
  if (!denormals_flushed()) {
    const __m256 inv = _mm256_set1_ps(p.inv_scale), scale = _mm256_set1_ps(p.scale);
    const __m256 offset = _mm256_set1_ps(p.offset), qmin = _mm256_set1_ps(p.qmin), qmax = _mm256_set1_ps(p.qmax);
    for (; i + 8 <= end; i += 8) {
      const __m256 v = _mm256_mul_ps(_mm256_sub_ps(load_8_as_float<kType>(in, i), offset), inv);
      const __m256 rounded = _mm256_round_ps(v, _MM_FROUND_CUR_DIRECTION | _MM_FROUND_NO_EXC);
      const __m256 code = _mm256_min_ps(qmax, _mm256_max_ps(qmin, rounded));
      store_8_from_float<kType>(out, i, _mm256_add_ps(_mm256_mul_ps(code, scale), offset));
    }
  }
  forward_generic<kType>(in, out, i, end, p);
}

// Eight elements at i: grad_x stored, the terms added to four-lane double sums (lanes i..i+3, i+4..i+7).
template <FloatType kType>
static inline void backward8(const void* x, const void* grad, void* grad_x, int64_t i, const LsqParams& p,
                             __m256d* scale_acc, __m256d* offset_acc) {
  const __m256 inv = _mm256_set1_ps(p.inv_scale), offset = _mm256_set1_ps(p.offset);
  const __m256 qmin = _mm256_set1_ps(p.qmin), qmax = _mm256_set1_ps(p.qmax);
  const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
  const __m256 g = load_8_as_float<kType>(grad, i);
  const __m256 v = _mm256_mul_ps(_mm256_sub_ps(load_8_as_float<kType>(x, i), offset), inv);
  const __m256 below = _mm256_cmp_ps(v, qmin, _CMP_LT_OQ);
  const __m256 outside = _mm256_or_ps(below, _mm256_cmp_ps(v, qmax, _CMP_GT_OQ));
  const __m256 rounded = _mm256_round_ps(v, _MM_FROUND_CUR_DIRECTION | _MM_FROUND_NO_EXC);
  // blendv(a, b, m) is m ? b : a
  const __m256 slope = _mm256_blendv_ps(_mm256_sub_ps(rounded, v), _mm256_blendv_ps(qmax, qmin, below), outside);
  store_8_from_float<kType>(grad_x, i, _mm256_mul_ps(g, _mm256_blendv_ps(one, zero, outside)));
  const __m256 scale_term = _mm256_mul_ps(g, slope);
  const __m256 offset_term = _mm256_mul_ps(g, _mm256_blendv_ps(zero, one, outside));
  scale_acc[0] = _mm256_add_pd(scale_acc[0], _mm256_cvtps_pd(_mm256_castps256_ps128(scale_term)));
  scale_acc[1] = _mm256_add_pd(scale_acc[1], _mm256_cvtps_pd(_mm256_extractf128_ps(scale_term, 1)));
  offset_acc[0] = _mm256_add_pd(offset_acc[0], _mm256_cvtps_pd(_mm256_castps256_ps128(offset_term)));
  offset_acc[1] = _mm256_add_pd(offset_acc[1], _mm256_cvtps_pd(_mm256_extractf128_ps(offset_term, 1)));
}

template <FloatType kType>
static void backward_simd(const void* x, const void* grad, void* grad_x, int64_t begin, int64_t end, const LsqParams& p,
                          bool /*stream*/, double* scale_sum, double* offset_sum) {
  if (denormals_flushed()) return backward_generic<kType>(x, grad, grad_x, begin, end, p, false, scale_sum, offset_sum);
  // four registers of four lanes each: lanes 0..3, 4..7, 8..11, 12..15 of the plain loop
  __m256d scale_acc[4], offset_acc[4];
  for (int k = 0; k < 4; ++k) scale_acc[k] = offset_acc[k] = _mm256_setzero_pd();
  int64_t i = begin;
  for (; i + 16 <= end; i += 16) {
    backward8<kType>(x, grad, grad_x, i, p, scale_acc, offset_acc);
    backward8<kType>(x, grad, grad_x, i + 8, p, scale_acc + 2, offset_acc + 2);
  }
  alignas(32) double scale_lanes[kLsqLanes], offset_lanes[kLsqLanes];
  for (int k = 0; k < 4; ++k) {
    _mm256_store_pd(scale_lanes + 4 * k, scale_acc[k]);
    _mm256_store_pd(offset_lanes + 4 * k, offset_acc[k]);
  }
  backward_lanes<kType>(x, grad, grad_x, begin, i, end, p, scale_lanes, offset_lanes);
  sum_lanes(scale_lanes, offset_lanes, scale_sum, offset_sum);
}
#endif

#if defined(__AVX512F__) || defined(__AVX2__)
#define BNBX_LSQ_KERNEL(name) name##_simd
#else
#define BNBX_LSQ_KERNEL(name) name##_generic
#endif

static void forward(FloatType type, const void* in, void* out, int64_t begin, int64_t end, const LsqParams& p,
                    bool stream) {
  switch (type) {
    case FloatType::kFloat32:
      return BNBX_LSQ_KERNEL(forward)<FloatType::kFloat32>(in, out, begin, end, p, stream);
    case FloatType::kFloat16:
      return BNBX_LSQ_KERNEL(forward)<FloatType::kFloat16>(in, out, begin, end, p, stream);
    case FloatType::kBFloat16:
      return BNBX_LSQ_KERNEL(forward)<FloatType::kBFloat16>(in, out, begin, end, p, stream);
  }
}

static void backward(FloatType type, const void* x, const void* grad, void* grad_x, int64_t begin, int64_t end,
                     const LsqParams& p, bool stream, double* scale_sum, double* offset_sum) {
  switch (type) {
    case FloatType::kFloat32:
      return BNBX_LSQ_KERNEL(backward)<FloatType::kFloat32>(x, grad, grad_x, begin, end, p, stream, scale_sum,
                                                            offset_sum);
    case FloatType::kFloat16:
      return BNBX_LSQ_KERNEL(backward)<FloatType::kFloat16>(x, grad, grad_x, begin, end, p, stream, scale_sum,
                                                            offset_sum);
    case FloatType::kBFloat16:
      return BNBX_LSQ_KERNEL(backward)<FloatType::kBFloat16>(x, grad, grad_x, begin, end, p, stream, scale_sum,
                                                             offset_sum);
  }
}

#undef BNBX_LSQ_KERNEL

}  // namespace BNBX_ISA

const FakeQuantLsqKernels BNBX_TABLE(fake_quant_lsq) = {BNBX_ISA_NAME, &BNBX_ISA::forward, &BNBX_ISA::backward};

}  // namespace bnbx::cpu
