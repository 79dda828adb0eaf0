// The LoRA adapter's products (kernels/lora.h), compiled once per instruction set with BNBX_ISA set to scalar,
// avx2 or avx512 (CMakeLists.txt: bnbx_add_cpu_family(lora)). The plain loops are the C++ twin of
// tests/reference_lora.py. The SIMD paths keep blocks of rows x columns of fp32 sums in registers (kRowBlock x
// kColBlock vectors), so each load of an activation or a weight feeds several FMAs; expand_rows and accumulate_rows
// (a few rows) sum along r instead. Within one kernel the order of an output element's operations depends only on
// its position (never on the block or the thread that computes it), so results do not change with the thread
// count; they may differ from the plain loop's in the last bits (FMA, and lane-wise partial sums).
#include "isa_unit.h"
#include "lora.h"

#if defined(__AVX512F__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ < 13
// GCC 12's PR 105593 again (see isa_unit.h), in its definite form here: the fp16 store's intrinsics start from
// _mm512_undefined_*(), and inlined into the blocks of sums below GCC reports them "used uninitialized".
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

namespace bnbx::cpu {
namespace BNBX_ISA {

#include "simd.h"

// --- plain loops (the scalar table, and the SIMD paths' edges) ------------------------------------------------

template <FloatType kX>
static float dot_one(const void* X, int64_t row, int64_t k_begin, int64_t K, const float* w, float sum) {
  for (int64_t k = k_begin; k < K; ++k) sum += load_as_float<kX>(X, row * K + k) * w[k];
  return sum;
}

template <FloatType kX>
static void dot_generic(const void* X, int64_t K, const float* W, int64_t r, float scale, float* out, int64_t m_begin,
                        int64_t m_end) {
  for (int64_t m = m_begin; m < m_end; ++m) {
    for (int64_t j = 0; j < r; ++j) out[m * r + j] = scale * dot_one<kX>(X, m, 0, K, W + j * K, 0.0f);
  }
}

// expand for row m, columns [n_begin, n_end)
template <FloatType kY>
static void expand_columns(const float* H, int64_t r, const float* W, int64_t N, const void* base, void* Y, int64_t m,
                           int64_t n_begin, int64_t n_end) {
  for (int64_t n = n_begin; n < n_end; ++n) {
    float sum = base == nullptr ? 0.0f : load_as_float<kY>(base, m * N + n);
    for (int64_t j = 0; j < r; ++j) sum += H[m * r + j] * W[j * N + n];
    store_from_float<kY>(Y, m * N + n, sum);
  }
}

template <FloatType kY>
static void expand_generic(const float* H, int64_t r, const float* W, int64_t N, const void* base, void* Y,
                           int64_t m_begin, int64_t m_end) {
  for (int64_t m = m_begin; m < m_end; ++m) expand_columns<kY>(H, r, W, N, base, Y, m, 0, N);
}

// expand_rows for row m, outputs [n_begin, n_end)
template <FloatType kY>
static void expand_rows_columns(const float* H, int64_t r, const float* W, int64_t N, const void* base, void* Y,
                                int64_t m, int64_t n_begin, int64_t n_end) {
  for (int64_t n = n_begin; n < n_end; ++n) {
    float dot = 0.0f;
    for (int64_t j = 0; j < r; ++j) dot += H[m * r + j] * W[n * r + j];
    store_from_float<kY>(Y, m * N + n, base == nullptr ? dot : load_as_float<kY>(base, m * N + n) + dot);
  }
}

template <FloatType kY>
static void expand_rows_generic(const float* H, int64_t r, const float* W, int64_t N, const void* base, void* Y,
                                int64_t m_begin, int64_t m_end) {
  for (int64_t m = m_begin; m < m_end; ++m) expand_rows_columns<kY>(H, r, W, N, base, Y, m, 0, N);
}

template <FloatType kQ>
static void accumulate_rows_generic(const void* Q, int64_t q_row, int64_t q_step, int64_t T, const float* V, int64_t r,
                                    float scale, float* out, int64_t i_begin, int64_t i_end) {
  for (int64_t i = i_begin; i < i_end; ++i) {
    for (int64_t j = 0; j < r; ++j) {
      float sum = 0.0f;
      for (int64_t t = 0; t < T; ++t) sum += load_as_float<kQ>(Q, i * q_row + t * q_step) * V[t * r + j];
      out[i * r + j] = scale * sum;
    }
  }
}

template <FloatType kQ>
static void outer_generic(const float* P, int64_t M, int64_t r, const void* Q, int64_t N, float* out, int64_t n_begin,
                          int64_t n_end) {
  for (int64_t j = 0; j < r; ++j) {
    for (int64_t n = n_begin; n < n_end; ++n) {
      float sum = 0.0f;
      for (int64_t m = 0; m < M; ++m) sum += P[m * r + j] * load_as_float<kQ>(Q, m * N + n);
      out[j * N + n] = sum;
    }
  }
}

#if defined(__AVX512F__) || defined(__AVX2__)
// One vector of fp32 lanes of this instruction set, and the block of sums each kernel keeps in registers:
// kRowBlock x kColBlock vectors (AVX-512: 16 of 32 zmm; AVX2: 8 of 16 ymm), plus the operands of one step.
#if defined(__AVX512F__)
struct Simd {
  using V = __m512;
  static constexpr int64_t kLanes = 16;
  static V zero() { return _mm512_setzero_ps(); }
  static V set1(float value) { return _mm512_set1_ps(value); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  template <FloatType kType>
  static V load_as(const void* p, int64_t i) {
    return load_16_as_float<kType>(p, i);
  }
  template <FloatType kType>
  static void store_as(void* p, int64_t i, V v) {
    store_16_from_float<kType>(p, i, v);
  }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static float sum(V v) { return _mm512_reduce_add_ps(v); }
  // the first `count` (0..16) floats at p, zero beyond; stores of the first `count` lanes
  static V load_first(const float* p, int64_t count) {
    return count == kLanes ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(first_lanes_16(count), p);
  }
  static void store_first(float* p, int64_t count, V v) { _mm512_mask_storeu_ps(p, first_lanes_16(count), v); }
  // lane i: the sum of the lanes of v[i] (a transpose-and-add tree: 15 adds for 16 vectors)
  static V sum_each(const V (&v)[16]) {
    __m512 pairs[8], quads[4];
    for (int k = 0; k < 8; ++k)  // per 128-bit lane: v[2k] and v[2k+1], two partial sums each
      pairs[k] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * k], v[2 * k + 1]), _mm512_unpackhi_ps(v[2 * k], v[2 * k + 1]));
    for (int k = 0; k < 4; ++k) {  // per 128-bit lane: v[4k .. 4k+3], one partial sum each
      const __m512d a = _mm512_castps_pd(pairs[2 * k]), b = _mm512_castps_pd(pairs[2 * k + 1]);
      quads[k] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    __m512 halves[2];
    for (int k = 0; k < 2; ++k)  // the four 128-bit lanes added in pairs
      halves[k] = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2 * k], quads[2 * k + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                                _mm512_shuffle_f32x4(quads[2 * k], quads[2 * k + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(halves[0], halves[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(halves[0], halves[1], _MM_SHUFFLE(3, 1, 3, 1)));
  }
};
constexpr int kColBlock = 4;
#else
struct Simd {
  using V = __m256;
  static constexpr int64_t kLanes = 8;
  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float value) { return _mm256_set1_ps(value); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  template <FloatType kType>
  static V load_as(const void* p, int64_t i) {
    return load_8_as_float<kType>(p, i);
  }
  template <FloatType kType>
  static void store_as(void* p, int64_t i, V v) {
    store_8_from_float<kType>(p, i, v);
  }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static float sum(V v) {
    const __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 quarter = _mm_add_ps(half, _mm_movehl_ps(half, half));
    return _mm_cvtss_f32(_mm_add_ss(quarter, _mm_movehdup_ps(quarter)));
  }
  static __m256i first_lanes(int64_t count) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(count)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static V load_first(const float* p, int64_t count) {
    return count == kLanes ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, first_lanes(count));
  }
  static void store_first(float* p, int64_t count, V v) { _mm256_maskstore_ps(p, first_lanes(count), v); }
  static V sum_each(const V (&v)[8]) {
    // per 128-bit lane: hadd twice gives v[0..3]'s (v[4..7]'s) partial sums, then the two lanes are added
    const __m256 low = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
    const __m256 high = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(low, high, 0x20), _mm256_permute2f128_ps(low, high, 0x31));
  }
};
constexpr int kColBlock = 2;
#endif
constexpr int kRowBlock = 4;
constexpr int64_t kLanes = Simd::kLanes;
using V = Simd::V;

// dot: kR rows of X from m against kJ rows of W from j, lane-wise sums over whole vectors of K, then the rest
template <FloatType kX, int kR, int kJ>
static void dot_block(const void* X, int64_t K, const float* W, int64_t r, float scale, float* out, int64_t m,
                      int64_t j) {
  V acc[kR][kJ];
  for (int i = 0; i < kR; ++i)
    for (int c = 0; c < kJ; ++c) acc[i][c] = Simd::zero();
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes) {
    V x[kR];
    for (int i = 0; i < kR; ++i) x[i] = Simd::load_as<kX>(X, (m + i) * K + k);
    for (int c = 0; c < kJ; ++c) {
      const V w = Simd::load(W + (j + c) * K + k);
      for (int i = 0; i < kR; ++i) acc[i][c] = Simd::fma(x[i], w, acc[i][c]);
    }
  }
  for (int i = 0; i < kR; ++i)
    for (int c = 0; c < kJ; ++c)
      out[(m + i) * r + j + c] = scale * dot_one<kX>(X, m + i, k, K, W + (j + c) * K, Simd::sum(acc[i][c]));
}

template <FloatType kX, int kR>
static void dot_rows(const void* X, int64_t K, const float* W, int64_t r, float scale, float* out, int64_t m) {
  int64_t j = 0;
  for (; j + kColBlock <= r; j += kColBlock) dot_block<kX, kR, kColBlock>(X, K, W, r, scale, out, m, j);
  for (; j < r; ++j) dot_block<kX, kR, 1>(X, K, W, r, scale, out, m, j);
}

template <FloatType kX>
static void dot_simd(const void* X, int64_t K, const float* W, int64_t r, float scale, float* out, int64_t m_begin,
                     int64_t m_end) {
  int64_t m = m_begin;
  for (; m + kRowBlock <= m_end; m += kRowBlock) dot_rows<kX, kRowBlock>(X, K, W, r, scale, out, m);
  for (; m < m_end; ++m) dot_rows<kX, 1>(X, K, W, r, scale, out, m);
}

// expand: kR rows from m, kV vectors of columns from n; the sums start from base (or zero)
template <FloatType kY, int kR, int kV>
static void expand_block(const float* H, int64_t r, const float* W, int64_t N, const void* base, void* Y, int64_t m,
                         int64_t n) {
  V acc[kR][kV];
  for (int i = 0; i < kR; ++i)
    for (int v = 0; v < kV; ++v)
      acc[i][v] = base == nullptr ? Simd::zero() : Simd::load_as<kY>(base, (m + i) * N + n + v * kLanes);
  for (int64_t j = 0; j < r; ++j) {
    V w[kV];
    for (int v = 0; v < kV; ++v) w[v] = Simd::load(W + j * N + n + v * kLanes);
    for (int i = 0; i < kR; ++i) {
      const V h = Simd::set1(H[(m + i) * r + j]);
      for (int v = 0; v < kV; ++v) acc[i][v] = Simd::fma(h, w[v], acc[i][v]);
    }
  }
  for (int i = 0; i < kR; ++i)
    for (int v = 0; v < kV; ++v) Simd::store_as<kY>(Y, (m + i) * N + n + v * kLanes, acc[i][v]);
}

// Columns outermost: the kV vectors of W's columns (r x 64 floats with AVX-512) stay in L1 while every row passes.
template <FloatType kY, int kV>
static void expand_column_block(const float* H, int64_t r, const float* W, int64_t N, const void* base, void* Y,
                                int64_t m_begin, int64_t m_end, int64_t n) {
  int64_t m = m_begin;
  for (; m + kRowBlock <= m_end; m += kRowBlock) expand_block<kY, kRowBlock, kV>(H, r, W, N, base, Y, m, n);
  for (; m < m_end; ++m) expand_block<kY, 1, kV>(H, r, W, N, base, Y, m, n);
}

template <FloatType kY>
static void expand_simd(const float* H, int64_t r, const float* W, int64_t N, const void* base, void* Y,
                        int64_t m_begin, int64_t m_end) {
  int64_t n = 0;
  for (; n + kColBlock * kLanes <= N; n += kColBlock * kLanes)
    expand_column_block<kY, kColBlock>(H, r, W, N, base, Y, m_begin, m_end, n);
  for (; n + kLanes <= N; n += kLanes) expand_column_block<kY, 1>(H, r, W, N, base, Y, m_begin, m_end, n);
  for (int64_t m = m_begin; m < m_end; ++m) expand_columns<kY>(H, r, W, N, base, Y, m, n, N);
}

// expand_rows: kLanes outputs at a time, their rows of W against H's row lane-wise over r (a zero-filled last
// vector), then Simd::sum_each
template <FloatType kY>
static void expand_rows_simd(const float* H, int64_t r, const float* W, int64_t N, const void* base, void* Y,
                             int64_t m_begin, int64_t m_end) {
  for (int64_t m = m_begin; m < m_end; ++m) {
    const float* h = H + m * r;
    int64_t n = 0;
    for (; n + kLanes <= N; n += kLanes) {
      V acc[kLanes];
      for (int i = 0; i < kLanes; ++i) acc[i] = Simd::zero();
      for (int64_t j = 0; j < r; j += kLanes) {
        const int64_t width = std::min<int64_t>(kLanes, r - j);
        const V hv = Simd::load_first(h + j, width);
        for (int i = 0; i < kLanes; ++i) acc[i] = Simd::fma(Simd::load_first(W + (n + i) * r + j, width), hv, acc[i]);
      }
      V sums = Simd::sum_each(acc);
      if (base != nullptr) sums = Simd::add(Simd::load_as<kY>(base, m * N + n), sums);
      Simd::store_as<kY>(Y, m * N + n, sums);
    }
    expand_rows_columns<kY>(H, r, W, N, base, Y, m, n, N);
  }
}

// accumulate_rows: r lanes at a time (up to 4 vectors of sums), one broadcast of Q per t
template <FloatType kQ>
static void accumulate_rows_simd(const void* Q, int64_t q_row, int64_t q_step, int64_t T, const float* V_rows,
                                 int64_t r, float scale, float* out, int64_t i_begin, int64_t i_end) {
  constexpr int64_t kChunk = 4 * kLanes;
  for (int64_t i = i_begin; i < i_end; ++i) {
    for (int64_t j0 = 0; j0 < r; j0 += kChunk) {
      const int64_t width = std::min<int64_t>(kChunk, r - j0);
      int64_t widths[4];
      for (int v = 0; v < 4; ++v) widths[v] = std::clamp<int64_t>(width - kLanes * v, 0, kLanes);
      V acc[4] = {Simd::zero(), Simd::zero(), Simd::zero(), Simd::zero()};
      for (int64_t t = 0; t < T; ++t) {
        const V q = Simd::set1(load_as_float<kQ>(Q, i * q_row + t * q_step));
        const float* row = V_rows + t * r + j0;
        for (int v = 0; v < 4; ++v)
          if (widths[v] > 0) acc[v] = Simd::fma(q, Simd::load_first(row + kLanes * v, widths[v]), acc[v]);
      }
      for (int v = 0; v < 4; ++v)
        if (widths[v] > 0)
          Simd::store_first(out + i * r + j0 + kLanes * v, widths[v], Simd::mul(Simd::set1(scale), acc[v]));
    }
  }
}

// outer: kJ rows of the result from j, kV vectors of columns from n, summed over every row of P and Q in order
template <FloatType kQ, int kJ, int kV>
static void outer_block(const float* P, int64_t M, int64_t r, const void* Q, int64_t N, float* out, int64_t j,
                        int64_t n) {
  V acc[kJ][kV];
  for (int c = 0; c < kJ; ++c)
    for (int v = 0; v < kV; ++v) acc[c][v] = Simd::zero();
  for (int64_t m = 0; m < M; ++m) {
    V q[kV];
    for (int v = 0; v < kV; ++v) q[v] = Simd::load_as<kQ>(Q, m * N + n + v * kLanes);
    for (int c = 0; c < kJ; ++c) {
      const V p = Simd::set1(P[m * r + j + c]);
      for (int v = 0; v < kV; ++v) acc[c][v] = Simd::fma(p, q[v], acc[c][v]);
    }
  }
  for (int c = 0; c < kJ; ++c)
    for (int v = 0; v < kV; ++v) Simd::store(out + (j + c) * N + n + v * kLanes, acc[c][v]);
}

template <FloatType kQ, int kV>
static void outer_columns(const float* P, int64_t M, int64_t r, const void* Q, int64_t N, float* out, int64_t n) {
  int64_t j = 0;
  for (; j + kColBlock <= r; j += kColBlock) outer_block<kQ, kColBlock, kV>(P, M, r, Q, N, out, j, n);
  for (; j < r; ++j) outer_block<kQ, 1, kV>(P, M, r, Q, N, out, j, n);
}

// The host splits the columns at multiples of kColBlock vectors, so which columns take which block does not depend
// on the split.
template <FloatType kQ>
static void outer_simd(const float* P, int64_t M, int64_t r, const void* Q, int64_t N, float* out, int64_t n_begin,
                       int64_t n_end) {
  int64_t n = n_begin;
  for (; n + kColBlock * kLanes <= n_end; n += kColBlock * kLanes) outer_columns<kQ, kColBlock>(P, M, r, Q, N, out, n);
  for (; n + kLanes <= n_end; n += kLanes) outer_columns<kQ, 1>(P, M, r, Q, N, out, n);
  outer_generic<kQ>(P, M, r, Q, N, out, n, n_end);
}
#define BNBX_LORA_KERNEL(name) name##_simd
#else
#define BNBX_LORA_KERNEL(name) name##_generic
#endif

// The table's entries: the dtype switch (with_float_type, simd.h), then this instruction set's loop.
static void dot(FloatType x_type, const void* X, int64_t K, const float* W, int64_t r, float scale, float* out,
                int64_t m_begin, int64_t m_end) {
  with_float_type(x_type,
                  [&](auto t) { BNBX_LORA_KERNEL(dot)<decltype(t)::value>(X, K, W, r, scale, out, m_begin, m_end); });
}

static void expand(const float* H, int64_t r, const float* W, int64_t N, FloatType y_type, const void* base, void* Y,
                   int64_t m_begin, int64_t m_end) {
  with_float_type(y_type,
                  [&](auto t) { BNBX_LORA_KERNEL(expand)<decltype(t)::value>(H, r, W, N, base, Y, m_begin, m_end); });
}

static void expand_rows(const float* H, int64_t r, const float* W, int64_t N, FloatType y_type, const void* base,
                        void* Y, int64_t m_begin, int64_t m_end) {
  with_float_type(
      y_type, [&](auto t) { BNBX_LORA_KERNEL(expand_rows)<decltype(t)::value>(H, r, W, N, base, Y, m_begin, m_end); });
}

static void accumulate_rows(FloatType q_type, const void* Q, int64_t q_row, int64_t q_step, int64_t T, const float* V,
                            int64_t r, float scale, float* out, int64_t i_begin, int64_t i_end) {
  with_float_type(q_type, [&](auto t) {
    BNBX_LORA_KERNEL(accumulate_rows)<decltype(t)::value>(Q, q_row, q_step, T, V, r, scale, out, i_begin, i_end);
  });
}

static void outer(const float* P, int64_t M, int64_t r, FloatType q_type, const void* Q, int64_t N, float* out,
                  int64_t n_begin, int64_t n_end) {
  with_float_type(q_type,
                  [&](auto t) { BNBX_LORA_KERNEL(outer)<decltype(t)::value>(P, M, r, Q, N, out, n_begin, n_end); });
}

#undef BNBX_LORA_KERNEL

}  // namespace BNBX_ISA

const LoraKernels BNBX_TABLE(lora) = {
    BNBX_ISA_NAME,   &BNBX_ISA::dot, &BNBX_ISA::expand, &BNBX_ISA::expand_rows, &BNBX_ISA::accumulate_rows,
    &BNBX_ISA::outer};

}  // namespace bnbx::cpu
