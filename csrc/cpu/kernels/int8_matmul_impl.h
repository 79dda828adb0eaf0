// LLM.int8() CPU kernels (see int8_matmul.h), compiled once per instruction set by bnbx_add_cpu_family with
// BNBX_ISA set to scalar, avx2 or avx512. The generic loops are the C++ twins of tests/reference_int8_matmul.py;
// every SIMD path gives the same bits (integer sums are exact, the float epilogue has the same operation order).
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ < 13
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC PR 105593, as in kernels_impl.h
#endif

#include "../../common/rules.h"
#include "int8_matmul.h"

namespace bnbx::cpu {
namespace BNBX_ISA {

#include "float_convert.h"

namespace {

constexpr float kInv127 = 7.874015718698502e-3f;  // bitsandbytes' 1/127
constexpr float kInv127Sq = 6.200124e-05f;        // bitsandbytes' 1/127^2 (default backend)

template <FloatType kIn>
void outlier_columns_generic(const void* A, int64_t K, float threshold, uint8_t* mask, int64_t row_begin,
                             int64_t row_end) {
  for (int64_t row = row_begin; row < row_end; ++row) {
    for (int64_t k = 0; k < K; ++k) {
      if (std::fabs(load_as_float<kIn>(A, row * K + k)) >= threshold) mask[k] = 1;
    }
  }
}

// Row statistic: max |x| over x with |x| < threshold (all x when threshold == 0); NaN if the row holds NaN.
template <FloatType kIn>
float row_stat_generic(const void* A, int64_t base, int64_t K, float threshold) {
  float amax = 0.0f;
  bool nan = false;
  for (int64_t k = 0; k < K; ++k) {
    const float ax = std::fabs(load_as_float<kIn>(A, base + k));
    if (ax != ax) {
      nan = true;
    } else if (threshold == 0.0f || ax < threshold) {
      amax = ax > amax ? ax : amax;
    }
  }
  return nan ? std::numeric_limits<float>::quiet_NaN() : amax;
}

// round half to even; NaN (a zero, Inf or NaN row statistic) and +-Inf (1 / stat overflowed: a row whose absmax is
// below 2^-128) give 0, as the AVX-512 path's conversion does (casting Inf to an integer would be undefined)
inline int8_t quantize_value(float v) { return std::fabs(v) <= FLT_MAX ? static_cast<int8_t>(std::nearbyint(v)) : 0; }

template <FloatType kIn>
void vectorwise_quant_generic(const void* A, int64_t K, float threshold, const uint8_t* mask, int8_t* q, int64_t ldq,
                              float* stats, int64_t row_begin, int64_t row_end) {
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t base = row * K;
    const float stat = row_stat_generic<kIn>(A, base, K, threshold);
    stats[row] = stat;
    const float scale = (1.0f / stat) * 127.0f;  // torch's 127.0 / t is reciprocal(t) * 127: two roundings
    for (int64_t k = 0; k < K; ++k) {
      const bool outlier = mask != nullptr && mask[k] != 0;
      q[row * ldq + k] = outlier ? 0 : quantize_value(load_as_float<kIn>(A, base + k) * scale);
    }
  }
}

#if defined(__AVX512F__)
template <FloatType kIn>
inline __m512 load16(const void* A, int64_t i, __mmask16 m) {
  if constexpr (kIn == FloatType::kFloat32) {
    return _mm512_maskz_loadu_ps(m, static_cast<const float*>(A) + i);
  } else if constexpr (kIn == FloatType::kFloat16) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(A) + i));
  } else {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(A) + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
  }
}

inline __mmask16 tail_mask(int64_t left) { return left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1u); }

template <FloatType kIn>
void outlier_columns_avx512(const void* A, int64_t K, float threshold, uint8_t* mask, int64_t row_begin,
                            int64_t row_end) {
  const __m512 thr = _mm512_set1_ps(threshold);
  const __m128i ones = _mm_set1_epi8(1);
  for (int64_t row = row_begin; row < row_end; ++row) {
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 m = tail_mask(K - k);
      const __m512 ax = _mm512_abs_ps(load16<kIn>(A, row * K + k, m));
      const __mmask16 hit = _mm512_mask_cmp_ps_mask(m, ax, thr, _CMP_GE_OQ);
      if (hit) _mm_mask_storeu_epi8(mask + k, hit, ones);
    }
  }
}

template <FloatType kIn>
void vectorwise_quant_avx512(const void* A, int64_t K, float threshold, const uint8_t* mask, int8_t* q, int64_t ldq,
                             float* stats, int64_t row_begin, int64_t row_end) {
  const __m512 thr = _mm512_set1_ps(threshold);
  const bool use_thr = threshold != 0.0f;
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t base = row * K;
    __m512 amax = _mm512_setzero_ps();
    __mmask16 nan = 0;
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 m = tail_mask(K - k);
      const __m512 ax = _mm512_abs_ps(load16<kIn>(A, base + k, m));
      nan |= _mm512_cmp_ps_mask(ax, ax, _CMP_UNORD_Q);
      const __mmask16 keep = use_thr ? _mm512_cmp_ps_mask(ax, thr, _CMP_LT_OQ) : __mmask16(0xffff);
      amax = _mm512_mask_max_ps(amax, keep, amax, ax);  // NaN lanes are tracked in `nan`
    }
    const float stat = nan ? std::numeric_limits<float>::quiet_NaN() : _mm512_reduce_max_ps(amax);
    stats[row] = stat;
    const __m512 scale = _mm512_set1_ps((1.0f / stat) * 127.0f);
    const __m128i zero = _mm_setzero_si128();
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 m = tail_mask(K - k);
      const __m512 v = _mm512_mul_ps(load16<kIn>(A, base + k, m), scale);
      const __m512 r = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      __mmask16 valid = _mm512_cmp_ps_mask(r, r, _CMP_ORD_Q);
      if (mask != nullptr) valid &= _mm_mask_cmpeq_epi8_mask(m, _mm_maskz_loadu_epi8(m, mask + k), zero);
      const __m512i qi = _mm512_maskz_cvtps_epi32(valid, r);
      _mm_mask_storeu_epi8(q + row * ldq + k, m, _mm512_cvtepi32_epi8(qi));
    }
  }
}
#endif

template <FloatType kIn>
void outlier_columns_t(const void* A, int64_t K, float threshold, uint8_t* mask, int64_t rb, int64_t re) {
#if defined(__AVX512F__)
  outlier_columns_avx512<kIn>(A, K, threshold, mask, rb, re);
#else
  outlier_columns_generic<kIn>(A, K, threshold, mask, rb, re);
#endif
}

template <FloatType kIn>
void vectorwise_quant_t(const void* A, int64_t K, float threshold, const uint8_t* mask, int8_t* q, int64_t ldq,
                        float* stats, int64_t rb, int64_t re) {
#if defined(__AVX512F__)
  vectorwise_quant_avx512<kIn>(A, K, threshold, mask, q, ldq, stats, rb, re);
#else
  vectorwise_quant_generic<kIn>(A, K, threshold, mask, q, ldq, stats, rb, re);
#endif
}

void outlier_columns(FloatType in_type, const void* A, int64_t K, float threshold, uint8_t* mask, int64_t rb,
                     int64_t re) {
  switch (in_type) {
    case FloatType::kFloat32:
      return outlier_columns_t<FloatType::kFloat32>(A, K, threshold, mask, rb, re);
    case FloatType::kFloat16:
      return outlier_columns_t<FloatType::kFloat16>(A, K, threshold, mask, rb, re);
    case FloatType::kBFloat16:
      return outlier_columns_t<FloatType::kBFloat16>(A, K, threshold, mask, rb, re);
  }
}

void vectorwise_quant(FloatType in_type, const void* A, int64_t K, float threshold, const uint8_t* mask, int8_t* q,
                      int64_t ldq, float* stats, int64_t rb, int64_t re) {
  switch (in_type) {
    case FloatType::kFloat32:
      return vectorwise_quant_t<FloatType::kFloat32>(A, K, threshold, mask, q, ldq, stats, rb, re);
    case FloatType::kFloat16:
      return vectorwise_quant_t<FloatType::kFloat16>(A, K, threshold, mask, q, ldq, stats, rb, re);
    case FloatType::kBFloat16:
      return vectorwise_quant_t<FloatType::kBFloat16>(A, K, threshold, mask, q, ldq, stats, rb, re);
  }
}

void vectorwise_dequant(const int8_t* q, const float* stats, int64_t K, float* out, int64_t rb, int64_t re) {
  for (int64_t row = rb; row < re; ++row) {
    const float s = stats[row];
    for (int64_t k = 0; k < K; ++k) out[row * K + k] = static_cast<float>(q[row * K + k]) * s * kInv127;
  }
}

// ---- int8 GEMM, C[m, n] = sum_k A[m, k] * B[n, k] ------------------------------------------------------------

#if defined(__AVX2__)
inline int32_t hsum256(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}
#endif

// Sign-extend 16 bytes to int16 and multiply-add pairs into int32 (exact: |2 * 128 * 128| fits).
void gemm(const int8_t* A, const int8_t* B, int32_t* C, int64_t M, int64_t N, int64_t K, int64_t n_begin,
          int64_t n_end) {
  for (int64_t m = 0; m < M; ++m) {
    const int8_t* a = A + m * K;
    for (int64_t n = n_begin; n < n_end; ++n) {
      const int8_t* b = B + n * K;
      int64_t k = 0;
      int32_t sum = 0;
#if defined(__AVX2__)
      __m256i acc = _mm256_setzero_si256();
      for (; k + 16 <= K; k += 16) {
        const __m256i a16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a + k)));
        const __m256i b16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + k)));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(a16, b16));
      }
      sum = hsum256(acc);
#endif
      for (; k < K; ++k) sum += static_cast<int32_t>(a[k]) * static_cast<int32_t>(b[k]);
      C[m * N + n] = sum;
    }
  }
}

#if defined(__AVX512F__)
#define BNBX_VNNI __attribute__((target("avx512vnni,avx512bw,avx512f")))

// vpdpbusd multiplies unsigned by signed bytes: sum (a + 128) * b - 128 * sum b = sum a * b. Blocks of 4 rows of
// B against 4 rows of A share every load; B's tail is zero-filled so A's tail bytes never count.
BNBX_VNNI void gemm_vnni(const int8_t* A, const int8_t* B, int32_t* C, int64_t M, int64_t N, int64_t K, int64_t n_begin,
                         int64_t n_end) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const __m512i ones = _mm512_set1_epi8(1);
  constexpr int64_t kMChunk = 64;  // rows of A kept hot in L2 while B streams
  for (int64_t m0 = 0; m0 < M; m0 += kMChunk) {
    const int64_t m_end = std::min(M, m0 + kMChunk);
    for (int64_t n = n_begin; n < n_end; n += 4) {
      const int64_t nb = std::min<int64_t>(4, n_end - n);
      for (int64_t m = m0; m < m_end; m += 4) {
        const int64_t mb = std::min<int64_t>(4, m_end - m);
        __m512i acc[4][4], bsum[4];
        for (int i = 0; i < 4; ++i) {
          bsum[i] = _mm512_setzero_si512();
          for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_si512();
        }
        for (int64_t k = 0; k < K; k += 64) {
          const __mmask64 km = K - k >= 64 ? ~__mmask64(0) : ((__mmask64(1) << (K - k)) - 1);
          __m512i b[4], a[4];
          for (int j = 0; j < 4; ++j) {
            b[j] = j < nb ? _mm512_maskz_loadu_epi8(km, B + (n + j) * K + k) : _mm512_setzero_si512();
            bsum[j] = _mm512_dpbusd_epi32(bsum[j], ones, b[j]);
          }
          for (int i = 0; i < 4; ++i) {
            a[i] = i < mb ? _mm512_xor_si512(_mm512_maskz_loadu_epi8(km, A + (m + i) * K + k), flip) : flip;
            for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], a[i], b[j]);
          }
        }
        for (int i = 0; i < mb; ++i) {
          for (int j = 0; j < nb; ++j) {
            C[(m + i) * N + n + j] = _mm512_reduce_add_epi32(acc[i][j]) - 128 * _mm512_reduce_add_epi32(bsum[j]);
          }
        }
      }
    }
  }
}

// One masked row of up to 16 outputs of the epilogue (mm_dequant): c[0..16) are the int32 sums of
// out[m, n..n+16). The one sequence of fp32 operations both mm_dequant and the fused AMX store run, so the
// two give the same bits.
template <FloatType kOut>
inline void store16(void* out, int64_t i, __mmask16 nm, __m512 t) {
  if constexpr (kOut == FloatType::kFloat32) {
    _mm512_mask_storeu_ps(static_cast<float*>(out) + i, nm, t);
  } else if constexpr (kOut == FloatType::kFloat16) {
    const __m256i h = _mm512_cvtps_ph(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_mask_storeu_epi16(static_cast<uint16_t*>(out) + i, nm, h);
  } else {
    // round to nearest even on the bits, NaN -> 0x7fc0 as float_to_bf16 does
    const __m512i bits = _mm512_castps_si512(t);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7fff)), lsb), 16);
    rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(t, t, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
    _mm256_mask_storeu_epi16(static_cast<uint16_t*>(out) + i, nm, _mm512_cvtepi32_epi16(rounded));
  }
}

// kRows rows (m .. m + kRows) of up to 16 outputs of the epilogue (mm_dequant): c_rows[r * ldc ..] are the int32
// sums of out[m + r, n..n+16). Every element takes the one sequence of fp32 operations (scale, bias, outlier
// products in column order, rounding), so mm_dequant and the fused AMX store give the same bits; rows are
// interleaved only so that the dependent adds of the outlier products of several rows overlap.
template <FloatType kOut, int kRows>
inline void dequant_rows(const int32_t* c_rows, int64_t ldc, int64_t m, int64_t n, __mmask16 nm, const Int8Epilogue& ep,
                         int64_t N) {
  const __m512 col = _mm512_maskz_loadu_ps(nm, ep.col_stats + n);
  __m512 bias = _mm512_setzero_ps();
  if (ep.bias != nullptr) {
    bias = ep.bias_type == FloatType::kFloat32   ? load16<FloatType::kFloat32>(ep.bias, n, nm)
           : ep.bias_type == FloatType::kFloat16 ? load16<FloatType::kFloat16>(ep.bias, n, nm)
                                                 : load16<FloatType::kBFloat16>(ep.bias, n, nm);
  }
  __m512 t[kRows];
  for (int r = 0; r < kRows; ++r) {
    const __m512 c = _mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(nm, c_rows + r * ldc));
    t[r] = _mm512_mul_ps(c, _mm512_mul_ps(_mm512_set1_ps(ep.row_stats[m + r]), col));
    t[r] = _mm512_mul_ps(t[r], _mm512_set1_ps(kInv127Sq));
    if (ep.bias != nullptr) t[r] = _mm512_add_ps(t[r], bias);
  }
  for (int64_t j = 0; j < ep.n_out; ++j) {
    const __m512 b = _mm512_maskz_loadu_ps(nm, ep.b_out + j * N + n);
    for (int r = 0; r < kRows; ++r) {
      t[r] = _mm512_add_ps(t[r], _mm512_mul_ps(_mm512_set1_ps(ep.a_out[(m + r) * ep.n_out + j]), b));
    }
  }
  for (int r = 0; r < kRows; ++r) store16<kOut>(ep.out, (m + r) * N + n, nm, t[r]);
}

// Rows [0, rows) of a block of up to 16 columns, four at a time.
template <FloatType kOut>
inline void dequant_block(const int32_t* c_rows, int64_t ldc, int64_t m, int64_t rows, int64_t n, __mmask16 nm,
                          const Int8Epilogue& ep, int64_t N) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) dequant_rows<kOut, 4>(c_rows + r * ldc, ldc, m + r, n, nm, ep, N);
  for (; r < rows; ++r) dequant_rows<kOut, 1>(c_rows + r * ldc, ldc, m + r, n, nm, ep, N);
}

// ---- AMX-INT8 -------------------------------------------------------------------------------------------------
// Tiles: 0-3 int32 accumulators (16 rows of A x 16 rows of B), 4-5 two 16-row slices of A (64 k bytes each,
// loaded in place with stride lda), 6-7 two packed 16-row blocks of B. B is packed once (amx_pack; the layer
// caches it with the weight).
#define BNBX_AMX __attribute__((target("amx-tile,amx-int8,avx512f,avx512bw,avx512vl")))

struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

int64_t amx_packed_bytes(int64_t rows, int64_t K) { return ceil_div(rows, 16) * 16 * ceil_div(K, 64) * 64; }

// Block b of 16 rows of X, k chunk c: a 1 KiB tile whose row r holds, for each of the 16 rows i, the 4 bytes
// X[16b + i, 64c + 4r .. 64c + 4r + 3] (TDPBSSD's second operand); zeros past the rows and K. Whole tiles are
// a 16 x 16 transpose of 4-byte groups: one gather per tile row.
void amx_pack_block(const int8_t* X, int64_t rows, int64_t K, int64_t b, uint8_t* dst) {
  const int64_t chunks = ceil_div(K, 64);
  const __m512i offsets = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                             _mm512_set1_epi32(static_cast<int32_t>(K)));
  for (int64_t c = 0; c < chunks; ++c) {
    uint8_t* tile = dst + c * 1024;
    if (b * 16 + 16 <= rows && c * 64 + 64 <= K) {
      const int8_t* src = X + b * 16 * K + c * 64;
      for (int64_t r = 0; r < 16; ++r) {
        _mm512_storeu_si512(tile + r * 64, _mm512_i32gather_epi32(offsets, src + r * 4, 1));
      }
    } else {
      for (int64_t r = 0; r < 16; ++r) {
        for (int64_t i = 0; i < 16; ++i) {
          for (int64_t j = 0; j < 4; ++j) {
            const int64_t row = b * 16 + i, k = c * 64 + r * 4 + j;
            tile[r * 64 + i * 4 + j] = row < rows && k < K ? static_cast<uint8_t>(X[row * K + k]) : 0;
          }
        }
      }
    }
  }
}

void amx_pack(const int8_t* X, int64_t rows, int64_t K, uint8_t* packed, int64_t block_begin, int64_t block_end) {
  const int64_t chunks = ceil_div(K, 64);
  for (int64_t b = block_begin; b < block_end; ++b) amx_pack_block(X, rows, K, b, packed + b * chunks * 1024);
}

// The valid part (rows < M, columns < n_limit) of a 16 x 16 int32 tile image at C[m0.., n0..]: copied into C,
// or through the epilogue into ep->out.
inline void store_tile_image(const int32_t* buffer, int32_t* C, int64_t ldc, int64_t M, int64_t n_limit, int64_t m0,
                             int64_t n0, const Int8Epilogue* ep) {
  const int64_t rows = std::min<int64_t>(16, M - m0);
  if (ep != nullptr) {
    const __mmask16 nm = tail_mask(n_limit - n0);
    switch (ep->out_type) {
      case FloatType::kFloat32:
        return dequant_block<FloatType::kFloat32>(buffer, 16, m0, rows, n0, nm, *ep, ldc);
      case FloatType::kFloat16:
        return dequant_block<FloatType::kFloat16>(buffer, 16, m0, rows, n0, nm, *ep, ldc);
      case FloatType::kBFloat16:
        return dequant_block<FloatType::kBFloat16>(buffer, 16, m0, rows, n0, nm, *ep, ldc);
    }
    return;
  }
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < 16 && n0 + j < n_limit; ++j) C[(m0 + i) * ldc + n0 + j] = buffer[i * 16 + j];
  }
}

// Stores accumulator tile `t` (a literal: some compilers' _tile_stored pastes it into the instruction text) for
// C[m0.., n0..]: straight into C when the int32 result is wanted and the 16 x 16 block is inside, else through
// the buffer (partial blocks, and the fused epilogue).
#define BNBX_STORE_TILE(t, m0, n0)                                    \
  do {                                                                \
    if ((m0) < M && (n0) < n_limit) {                                 \
      if (ep == nullptr && (m0) + 16 <= M && (n0) + 16 <= n_limit) {  \
        _tile_stored(t, C + (m0) * ldc + (n0), ldc * 4);              \
      } else {                                                        \
        _tile_stored(t, buffer, 64);                                  \
        store_tile_image(buffer, C, ldc, M, n_limit, (m0), (n0), ep); \
      }                                                               \
    }                                                                 \
  } while (0)

// One 32 x 32 (or smaller) block of C over all of K: a0/a1 rows of A with stride as, b0/b1 packed B blocks.
template <bool kTwoM, bool kTwoN>
BNBX_AMX inline void amx_block(const int8_t* a, int64_t as, const uint8_t* b0, const uint8_t* b1, int64_t chunks,
                               int32_t* C, int64_t ldc, int64_t M, int64_t n_limit, int64_t m0, int64_t n0,
                               int32_t* buffer, const Int8Epilogue* ep) {
  _tile_zero(0);
  if (kTwoN) _tile_zero(1);
  if (kTwoM) _tile_zero(2);
  if (kTwoM && kTwoN) _tile_zero(3);
  for (int64_t c = 0; c < chunks; ++c) {
    _tile_loadd(4, a + c * 64, as);
    _tile_loadd(6, b0 + c * 1024, 64);
    _tile_dpbssd(0, 4, 6);
    if (kTwoN) {
      _tile_loadd(7, b1 + c * 1024, 64);
      _tile_dpbssd(1, 4, 7);
    }
    if (kTwoM) {
      _tile_loadd(5, a + 16 * as + c * 64, as);
      _tile_dpbssd(2, 5, 6);
      if (kTwoN) _tile_dpbssd(3, 5, 7);
    }
  }
  BNBX_STORE_TILE(0, m0, n0);
  if (kTwoN) BNBX_STORE_TILE(1, m0, n0 + 16);
  if (kTwoM) BNBX_STORE_TILE(2, m0 + 16, n0);
  if (kTwoM && kTwoN) BNBX_STORE_TILE(3, m0 + 16, n0 + 16);
}

BNBX_AMX void gemm_amx(const int8_t* A, int64_t lda, int64_t a_bytes, const int8_t* B, const uint8_t* packed_B,
                       int32_t* C, int64_t M, int64_t N, int64_t K, int64_t n_begin, int64_t n_end,
                       const Int8Epilogue* ep) {
  TileConfig config{};
  config.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    config.colsb[t] = 64;
    config.rows[t] = 16;
  }
  _tile_loadconfig(&config);

  const int64_t chunks = ceil_div(K, 64);
  const int64_t n_blocks = ceil_div(N, 16);
  constexpr int64_t kRowsPerPass = 256;  // rows of A (1 MiB at K = 4096) kept in L2 while B panels stream past
  std::vector<int8_t> padded;            // the last rows of A, zero-filled to whole tiles
  std::vector<uint8_t> panel(packed_B == nullptr ? 2 * chunks * 1024 : 0);  // B packed on the fly
  alignas(64) int32_t buffer[256];

  for (int64_t p0 = 0; p0 < M; p0 += kRowsPerPass) {
    const int64_t p1 = std::min(M, p0 + kRowsPerPass);
    for (int64_t n0 = n_begin; n0 < n_end; n0 += 32) {
      const int64_t nb = n0 / 16;
      const bool two_n = nb + 1 < n_blocks && n0 + 16 < n_end;
      const uint8_t* b0;
      if (packed_B != nullptr) {
        b0 = packed_B + nb * chunks * 1024;
      } else {
        amx_pack_block(B, N, K, nb, panel.data());
        if (two_n) amx_pack_block(B, N, K, nb + 1, panel.data() + chunks * 1024);
        b0 = panel.data();
        if (p0 == 0 && ep != nullptr && ep->gather_b_out != nullptr) {
          for (int64_t n = n0; n < std::min(n0 + 32, n_end); ++n) {
            for (int64_t j = 0; j < ep->n_out; ++j) {
              ep->gather_b_out[j * N + n] =
                  static_cast<float>(B[n * K + ep->gather_cols[j]]) * ep->col_stats[n] * kInv127;
            }
          }
        }
      }
      const uint8_t* b1 = b0 + chunks * 1024;
      for (int64_t m0 = p0; m0 < p1; m0 += 32) {
        // the 32 tile rows read 64 * chunks bytes each from row m0 on; where that passes the end of A, the
        // rows are first copied into a zero-filled buffer
        const bool direct = (m0 + 31) * lda + chunks * 64 <= a_bytes;
        const int8_t* a = A + m0 * lda;
        int64_t as = lda;
        if (!direct) {
          padded.assign(32 * chunks * 64, 0);
          for (int64_t r = 0; r < 32 && m0 + r < M; ++r) std::memcpy(&padded[r * chunks * 64], A + (m0 + r) * lda, K);
          a = padded.data();
          as = chunks * 64;
        }
        const bool two_m = m0 + 16 < M;
        if (two_m && two_n)
          amx_block<true, true>(a, as, b0, b1, chunks, C, N, M, n_end, m0, n0, buffer, ep);
        else if (two_m)
          amx_block<true, false>(a, as, b0, b1, chunks, C, N, M, n_end, m0, n0, buffer, ep);
        else if (two_n)
          amx_block<false, true>(a, as, b0, b1, chunks, C, N, M, n_end, m0, n0, buffer, ep);
        else
          amx_block<false, false>(a, as, b0, b1, chunks, C, N, M, n_end, m0, n0, buffer, ep);
      }
    }
  }
  _tile_release();
}
#undef BNBX_STORE_TILE
#endif

// ---- epilogue -------------------------------------------------------------------------------------------------

template <FloatType kOut>
void mm_dequant_generic(const int32_t* C, const float* row_stats, const float* col_stats, FloatType bias_type,
                        const void* bias, const float* a_out, const float* b_out, int64_t n_out, void* out, int64_t N,
                        int64_t rb, int64_t re) {
  for (int64_t m = rb; m < re; ++m) {
    const float r = row_stats[m];
    for (int64_t n = 0; n < N; ++n) {
      float t = static_cast<float>(C[m * N + n]) * (r * col_stats[n]);
      t = t * kInv127Sq;
      if (bias != nullptr) {
        t = t + (bias_type == FloatType::kFloat32   ? load_as_float<FloatType::kFloat32>(bias, n)
                 : bias_type == FloatType::kFloat16 ? load_as_float<FloatType::kFloat16>(bias, n)
                                                    : load_as_float<FloatType::kBFloat16>(bias, n));
      }
      for (int64_t j = 0; j < n_out; ++j) t = t + a_out[m * n_out + j] * b_out[j * N + n];
      store_from_float<kOut>(out, m * N + n, t);
    }
  }
}

#if defined(__AVX512F__)
template <FloatType kOut>
void mm_dequant_avx512(const int32_t* C, const float* row_stats, const float* col_stats, FloatType bias_type,
                       const void* bias, const float* a_out, const float* b_out, int64_t n_out, void* out, int64_t N,
                       int64_t rb, int64_t re) {
  const Int8Epilogue ep{row_stats, col_stats, bias_type, bias, a_out, b_out, n_out, kOut, out, nullptr, nullptr};
  // four rows at a time, row-major order through C
  int64_t m = rb;
  for (; m + 4 <= re; m += 4) {
    for (int64_t n = 0; n < N; n += 16) dequant_rows<kOut, 4>(C + m * N + n, N, m, n, tail_mask(N - n), ep, N);
  }
  for (; m < re; ++m) {
    for (int64_t n = 0; n < N; n += 16) dequant_rows<kOut, 1>(C + m * N + n, N, m, n, tail_mask(N - n), ep, N);
  }
}
#endif

template <FloatType kOut>
void mm_dequant_t(const int32_t* C, const float* row_stats, const float* col_stats, FloatType bias_type,
                  const void* bias, const float* a_out, const float* b_out, int64_t n_out, void* out, int64_t N,
                  int64_t rb, int64_t re) {
#if defined(__AVX512F__)
  mm_dequant_avx512<kOut>(C, row_stats, col_stats, bias_type, bias, a_out, b_out, n_out, out, N, rb, re);
#else
  mm_dequant_generic<kOut>(C, row_stats, col_stats, bias_type, bias, a_out, b_out, n_out, out, N, rb, re);
#endif
}

void mm_dequant(const int32_t* C, const float* row_stats, const float* col_stats, FloatType bias_type, const void* bias,
                const float* a_out, const float* b_out, int64_t n_out, FloatType out_type, void* out, int64_t N,
                int64_t rb, int64_t re) {
  switch (out_type) {
    case FloatType::kFloat32:
      return mm_dequant_t<FloatType::kFloat32>(C, row_stats, col_stats, bias_type, bias, a_out, b_out, n_out, out, N,
                                               rb, re);
    case FloatType::kFloat16:
      return mm_dequant_t<FloatType::kFloat16>(C, row_stats, col_stats, bias_type, bias, a_out, b_out, n_out, out, N,
                                               rb, re);
    case FloatType::kBFloat16:
      return mm_dequant_t<FloatType::kBFloat16>(C, row_stats, col_stats, bias_type, bias, a_out, b_out, n_out, out, N,
                                                rb, re);
  }
}

}  // namespace
}  // namespace BNBX_ISA

#define BNBX_STRINGIFY_(x) #x
#define BNBX_STRINGIFY(x) BNBX_STRINGIFY_(x)
#define BNBX_I8MM_TABLE_(isa) int8_matmul_##isa
#define BNBX_I8MM_TABLE(isa) BNBX_I8MM_TABLE_(isa)

const Int8MatmulKernels BNBX_I8MM_TABLE(BNBX_ISA) = {
    BNBX_STRINGIFY(BNBX_ISA), &BNBX_ISA::outlier_columns,  &BNBX_ISA::vectorwise_quant, &BNBX_ISA::vectorwise_dequant,
    &BNBX_ISA::gemm,
#if defined(__AVX512F__)
    &BNBX_ISA::gemm_vnni,     &BNBX_ISA::amx_packed_bytes, &BNBX_ISA::amx_pack,         &BNBX_ISA::gemm_amx,
#else
    nullptr,
    nullptr,
    nullptr,
    nullptr,
#endif
    &BNBX_ISA::mm_dequant,
};

}  // namespace bnbx::cpu
