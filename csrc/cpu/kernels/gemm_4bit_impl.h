// gemm_4bit family (see gemm_4bit.h), compiled once per instruction set with BNBX_ISA set by CMake.
//
// The generic loop is the C++ twin of tests/reference_gemm_4bit.py: per row of W and per block segment,
// sum code[q] * a in fp32, then scale the segment's sum by the block's absmax once. The SIMD paths keep that
// order of operations per lane (sums of products within a block, one absmax product per block) and differ
// from it only by the summation order inside the sums; except gemm_rows_blocked (kBlockA rows of A at a time),
// which multiplies each weight, code * absmax in fp32 (dequantize_4bit's fp32 value), so that one decoded vector
// serves 2 x kBlockA products.
//
// SIMD layout (AVX-512; AVX2 is the same with 8 lanes): one load of 64 packed bytes = 16 dwords, dword d
// holding elements 8d .. 8d+7 of a group of 128. Shifting every dword right by 4s puts nibble s in the low
// bits, and vpermps reads only the low 4 bits of its index, so one shift and one permute of the 16-value
// code table give lane d the weight of element 8d + (s ^ 1) (the high nibble of a byte is the even
// element). pack_a stores A in that order, so no shuffles of the weights are needed.
#include <vector>

#include "isa_unit.h"
#include "gemm_4bit.h"

namespace bnbx::cpu {
namespace BNBX_ISA {

#include "float_convert.h"

static inline float block_scale(const Absmax4bit& s, int64_t block) {
  if (s.absmax != nullptr) return s.absmax[block];
  const float scaled = s.nested_code[s.absmax_q[block]] * s.nested_absmax[block / s.nested_blocksize];
  return scaled + s.offset;
}

static inline int log2_of(int64_t power_of_two) { return __builtin_ctzll(static_cast<uint64_t>(power_of_two)); }

// Blocksizes are powers of two: shifts, not 64-bit divisions (tens of cycles each, per block).
#if defined(__AVX512F__)
// 16 blocks at a time: a gather from the 256-entry code table, the nested absmax broadcast, then the same fp32
// product and sum as the scalar loop, so the values are bit-identical.
static void decode_absmax(const Absmax4bit& absmax, int64_t block_begin, int64_t block_end, float* out) {
  if (absmax.absmax != nullptr) {
    std::memcpy(out, absmax.absmax + block_begin, static_cast<size_t>(block_end - block_begin) * sizeof(float));
    return;
  }
  const int shift = log2_of(absmax.nested_blocksize);
  const __m512 offset = _mm512_set1_ps(absmax.offset);
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t b = block_begin; b < block_end; b += 16) {
    const __mmask16 mask = static_cast<__mmask16>((1u << std::min<int64_t>(16, block_end - b)) - 1u);
    const __m512i q = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mask, absmax.absmax_q + b));
    const __m512 code = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mask, q, absmax.nested_code, 4);
    // nested_blocksize >= 32 (checked by the host), so the 16 blocks lie in one or two nested blocks: two
    // broadcasts, the second for lanes past the first nested block
    const int64_t first = b >> shift;
    const int64_t last = std::min(b + 15, block_end - 1) >> shift;
    const __mmask16 second =
        _mm512_cmpge_epi32_mask(_mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(b - (first << shift))), lanes),
                                _mm512_set1_epi32(static_cast<int>(absmax.nested_blocksize)));
    const __m512 scale = _mm512_mask_blend_ps(second, _mm512_set1_ps(absmax.nested_absmax[first]),
                                              _mm512_set1_ps(absmax.nested_absmax[last]));
    _mm512_mask_storeu_ps(out + (b - block_begin), mask, _mm512_add_ps(_mm512_mul_ps(code, scale), offset));
  }
}
#else
static void decode_absmax(const Absmax4bit& absmax, int64_t block_begin, int64_t block_end, float* out) {
  if (absmax.absmax != nullptr) {
    std::memcpy(out, absmax.absmax + block_begin, static_cast<size_t>(block_end - block_begin) * sizeof(float));
    return;
  }
  const int shift = log2_of(absmax.nested_blocksize);
  for (int64_t b = block_begin; b < block_end; ++b) {
    const float scaled = absmax.nested_code[absmax.absmax_q[b]] * absmax.nested_absmax[b >> shift];
    out[b - block_begin] = scaled + absmax.offset;
  }
}
#endif

template <FloatType kType>
static void convert_a(const void* A, int64_t count, float* out) {
  for (int64_t i = 0; i < count; ++i) out[i] = load_as_float<kType>(A, i);
}

static void convert_a_any(FloatType a_type, const void* A, int64_t count, float* out) {
  switch (a_type) {
    case FloatType::kFloat32:
      convert_a<FloatType::kFloat32>(A, count, out);
      break;
    case FloatType::kFloat16:
      convert_a<FloatType::kFloat16>(A, count, out);
      break;
    default:
      convert_a<FloatType::kBFloat16>(A, count, out);
      break;
  }
}

// Any K, any blocksize: blocks may span rows and rows may start on an odd nibble.
static void gemv_generic(const float* A, int64_t M, int64_t K, const uint8_t* packed, const Absmax4bit& absmax,
                         int64_t blocksize, QuantType quant_type, float* out, int64_t N, int64_t n_begin,
                         int64_t n_end) {
  float table[16];
  fill_code_table(quant_type, table);
  for (int64_t n = n_begin; n < n_end; ++n) {
    for (int64_t m = 0; m < M; ++m) {
      const float* a = A + m * K;
      float acc = 0.0f;
      int64_t k = 0;
      while (k < K) {
        const int64_t e0 = n * K + k;
        const int64_t block = e0 / blocksize;
        const int64_t seg_end = std::min(K, (block + 1) * blocksize - n * K);
        float sum = 0.0f;
        for (; k < seg_end; ++k) {
          const int64_t e = n * K + k;
          const uint8_t byte = packed[e >> 1];
          const int q = (e & 1) ? (byte & 0x0f) : (byte >> 4);
          sum += table[q] * a[k];
        }
        acc += sum * block_scale(absmax, block);
      }
      out[m * N + n] = acc;
    }
  }
}

#if defined(__AVX512F__) || defined(__AVX2__)
#if defined(__AVX512F__)
constexpr int64_t kLanes = 16;
#else
constexpr int64_t kLanes = 8;
#endif
// Elements per SIMD group: one vector of packed bytes (kLanes dwords of 8 nibbles each).
constexpr int64_t kGroup = 8 * kLanes;

static inline bool simd_layout(int64_t K) { return K > 0 && K % kGroup == 0; }

// A's group g, lane d of step s holds element 8d + (s ^ 1) (see the header comment).
static void pack_a(FloatType a_type, const void* A, int64_t M, int64_t K, float* out) {
  convert_a_any(a_type, A, M * K, out);
  if (!simd_layout(K)) return;
  float tmp[kGroup];
  for (int64_t base = 0; base < M * K; base += kGroup) {
    float* g = out + base;
    for (int64_t s = 0; s < 8; ++s)
      for (int64_t d = 0; d < kLanes; ++d) tmp[s * kLanes + d] = g[8 * d + (s ^ 1)];
    std::memcpy(g, tmp, sizeof(tmp));
  }
}
#else
static void pack_a(FloatType a_type, const void* A, int64_t M, int64_t K, float* out) {
  convert_a_any(a_type, A, M * K, out);
}
#endif

#if defined(__AVX512F__)
using Vec = __m512;
using VecI = __m512i;
static inline VecI load_bytes(const uint8_t* p) { return _mm512_loadu_si512(p); }
static inline Vec lookup(VecI codes, Vec lo, Vec) { return _mm512_permutexvar_ps(codes, lo); }
static inline VecI shift_right(VecI v, int bits) { return _mm512_srli_epi32(v, bits); }
static inline Vec fmadd(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline Vec vmul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
static inline Vec vload(const float* p) { return _mm512_loadu_ps(p); }
static inline Vec vzero() { return _mm512_setzero_ps(); }
static inline Vec vset1(float x) { return _mm512_set1_ps(x); }
static inline float hsum(Vec v) { return _mm512_reduce_add_ps(v); }
#elif defined(__AVX2__)
using Vec = __m256;
using VecI = __m256i;
static inline VecI load_bytes(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
// vpermps reads 3 index bits; the 4th bit (moved to the sign) picks the high half of the table.
static inline Vec lookup(VecI codes, Vec lo, Vec hi) {
  const Vec from_lo = _mm256_permutevar8x32_ps(lo, codes);
  const Vec from_hi = _mm256_permutevar8x32_ps(hi, codes);
  return _mm256_blendv_ps(from_lo, from_hi, _mm256_castsi256_ps(_mm256_slli_epi32(codes, 28)));
}
static inline VecI shift_right(VecI v, int bits) { return _mm256_srli_epi32(v, bits); }
static inline Vec fmadd(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline Vec vmul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
static inline Vec vload(const float* p) { return _mm256_loadu_ps(p); }
static inline Vec vzero() { return _mm256_setzero_ps(); }
static inline Vec vset1(float x) { return _mm256_set1_ps(x); }
static inline float hsum(Vec v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}
#endif

#if defined(__AVX512F__) || defined(__AVX2__)
// kRows rows of A against rows [n_begin, n_end) of W; K % kGroup == 0 so every row starts on a group, and a
// group holds whole blocks (blocksize < kGroup) or lies inside one block (blocksize >= kGroup).
#if defined(__AVX512F__)
// Lane d's scale from the block it lies in: scales[d / lanes_per_block] (count values readable at scales).
static inline Vec lane_scales(const float* scales, int64_t count, VecI lane_block) {
  const Vec loaded = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << count) - 1u), scales);
  return _mm512_permutexvar_ps(lane_block, loaded);
}
static inline VecI lane_blocks(int64_t lanes_per_block) {
  // the zero-masked shift: GCC 12 warns of the plain one's undefined pass-through where this is inlined deeply
  return _mm512_maskz_srli_epi32(0xffff, _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                 __builtin_ctzll(static_cast<uint64_t>(lanes_per_block)));
}
#else
static inline Vec lane_scales(const float* scales, int64_t count, VecI lane_block) {
  const VecI mask =
      _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(count)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  return _mm256_permutevar8x32_ps(_mm256_maskload_ps(scales, mask), lane_block);
}
static inline VecI lane_blocks(int64_t lanes_per_block) {
  return _mm256_srli_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                           __builtin_ctzll(static_cast<uint64_t>(lanes_per_block)));
}
#endif

// kRows rows of A against rows [n_begin, n_end) of W; K % kGroup == 0 so every row starts on a group, and a
// group holds whole blocks (blocksize < kGroup) or lies inside one block (blocksize >= kGroup). Each row's
// block scales are decoded first into row_scales (double quantization decoded here, never stored whole).
template <int kRows>
static void gemv_rows(const float* A, int64_t K, const uint8_t* packed, const Absmax4bit& absmax, int64_t blocksize,
                      const float table[16], float* row_scales, float* out, int64_t N, int64_t n_begin, int64_t n_end) {
  // AVX-512: one vector holds all 16 codes; AVX2: the two halves (a full-width load at table + 8 would read
  // past the table)
  const Vec table_lo = vload(table);
  const Vec table_hi = kLanes == 16 ? table_lo : vload(table + 8);
  const int64_t groups = K / kGroup;
  const int64_t blocks_per_group = blocksize < kGroup ? kGroup / blocksize : 1;
  const VecI lane_block = lane_blocks(blocksize < kGroup ? blocksize / 8 : kLanes);
  const int shift = log2_of(blocksize);
  for (int64_t n = n_begin; n < n_end; ++n) {
    const int64_t row_first_block = (n * K) >> shift;
    decode_absmax(absmax, row_first_block, ((n * K + K - 1) >> shift) + 1, row_scales);
    Vec total[kRows];
    for (int r = 0; r < kRows; ++r) total[r] = vzero();
    const uint8_t* row = packed + n * (K / 2);
    for (int64_t g = 0; g < groups; ++g) {
      // the rows of a thread's range are one contiguous run of bytes; the hardware prefetcher alone leaves
      // the core waiting on it
      _mm_prefetch(reinterpret_cast<const char*>(row + g * (kGroup / 2) + 8192), _MM_HINT_T0);
      const VecI bytes = load_bytes(row + g * (kGroup / 2));
      Vec part[kRows];
      for (int r = 0; r < kRows; ++r) part[r] = vzero();
      const float* a = A + g * kGroup;
      for (int s = 0; s < 8; ++s) {
        const Vec w = lookup(shift_right(bytes, 4 * s), table_lo, table_hi);
        for (int r = 0; r < kRows; ++r) part[r] = fmadd(w, vload(a + r * K + s * kLanes), part[r]);
      }
      const float* scales = row_scales + (((n * K + g * kGroup) >> shift) - row_first_block);
      const Vec scale = blocks_per_group == 1 ? vset1(scales[0]) : lane_scales(scales, blocks_per_group, lane_block);
      for (int r = 0; r < kRows; ++r) total[r] = fmadd(part[r], scale, total[r]);
    }
    for (int r = 0; r < kRows; ++r) out[r * N + n] = hsum(total[r]);
  }
}

// Rows [m, M) of A against rows [n0, n1) of W with gemv_rows, 4 at a time (inlined into both callers).
__attribute__((always_inline)) inline void gemv_rows_from(int64_t m, const float* A, int64_t M, int64_t K,
                                                          const uint8_t* packed, const Absmax4bit& absmax,
                                                          int64_t blocksize, const float table[16], float* row_scales,
                                                          float* out, int64_t N, int64_t n0, int64_t n1) {
  for (; m + 4 <= M; m += 4)
    gemv_rows<4>(A + m * K, K, packed, absmax, blocksize, table, row_scales, out + m * N, N, n0, n1);
  switch (M - m) {
    case 3:
      gemv_rows<3>(A + m * K, K, packed, absmax, blocksize, table, row_scales, out + m * N, N, n0, n1);
      break;
    case 2:
      gemv_rows<2>(A + m * K, K, packed, absmax, blocksize, table, row_scales, out + m * N, N, n0, n1);
      break;
    case 1:
      gemv_rows<1>(A + m * K, K, packed, absmax, blocksize, table, row_scales, out + m * N, N, n0, n1);
      break;
    default:
      break;
  }
}

// More rows of A (gemv takes it from kBlockA rows): kA rows of A against the rows [n0, n1) (at most kBlockRows) of
// W, two rows of W at a time, so that each decoded vector of W meets kA rows of A (gemv_rows decodes it again for
// every 4). Each lane's weight is code * absmax in fp32 (dequantize_4bit's fp32 value) before its products. K is
// walked in chunks of kChunkGroups groups, so the chunk of A stays in L1 while all the rows of W pass over it; the
// sums wait in `partial` between chunks. lane_block: lane_blocks() for this blocksize; row_scales: the rows' block
// scales, decoded by the caller (row r's from row_scales + r * (K / blocksize + 2)).
constexpr int64_t kBlockRows = 16;
#if defined(__AVX512F__)
constexpr int kBlockA = 10;  // 20 accumulators of 32 vector registers
#else
constexpr int kBlockA = 4;  // 8 accumulators of 16
#endif
constexpr int64_t kChunkGroups = 256 / kGroup;

template <int kA>
static void gemm_rows_blocked(const float* A, int64_t K, const uint8_t* packed, int64_t blocksize,
                              const float table[16], VecI lane_block, const float* row_scales, float* out, int64_t N,
                              int64_t n0, int64_t n1) {
  const Vec table_lo = vload(table);
  const Vec table_hi = kLanes == 16 ? table_lo : vload(table + 8);
  const int64_t groups = K / kGroup;
  const int64_t blocks_per_group = blocksize < kGroup ? kGroup / blocksize : 1;
  const int shift = log2_of(blocksize);
  const int64_t stride = K / blocksize + 2;  // row_scales per row of W
  const int64_t rows = n1 - n0;
  // the scale vector of group g of row r (its own row's block scales)
  const auto group_scale = [&](int64_t r, int64_t g) {
    const int64_t n = n0 + r;
    const float* scales = row_scales + r * stride + (((n * K + g * kGroup) >> shift) - ((n * K) >> shift));
    return blocks_per_group == 1 ? vset1(scales[0]) : lane_scales(scales, blocks_per_group, lane_block);
  };
  Vec partial[kBlockRows][kA];
  for (int64_t r = 0; r < rows; ++r)
    for (int m = 0; m < kA; ++m) partial[r][m] = vzero();
  // the chunk of A, contiguous: its rows K floats apart would all fall in one L1 set when K is a multiple of 1024
  alignas(64) float a_chunk[kA][kChunkGroups * kGroup];
  for (int64_t g0 = 0; g0 < groups; g0 += kChunkGroups) {
    const int64_t g1 = std::min(groups, g0 + kChunkGroups);
    for (int m = 0; m < kA; ++m)
      std::memcpy(a_chunk[m], A + m * K + g0 * kGroup, static_cast<size_t>((g1 - g0) * kGroup) * sizeof(float));
    for (int64_t r = 0; r < rows; r += 2) {
      const int64_t r1 = std::min(r + 1, rows - 1);  // an odd last row pairs with itself; its copy is dropped
      Vec acc0[kA], acc1[kA];
      for (int m = 0; m < kA; ++m) {
        acc0[m] = partial[r][m];
        acc1[m] = partial[r1][m];
      }
      const uint8_t* row0 = packed + (n0 + r) * (K / 2);
      const uint8_t* row1 = packed + (n0 + r1) * (K / 2);
      for (int64_t g = g0; g < g1; ++g) {
        const VecI bytes0 = load_bytes(row0 + g * (kGroup / 2));
        const VecI bytes1 = load_bytes(row1 + g * (kGroup / 2));
        const Vec scale0 = group_scale(r, g), scale1 = group_scale(r1, g);
        const float* a = &a_chunk[0][0] + (g - g0) * kGroup;
#pragma GCC unroll 8
        for (int s = 0; s < 8; ++s) {
          const Vec w0 = vmul(lookup(shift_right(bytes0, 4 * s), table_lo, table_hi), scale0);
          const Vec w1 = vmul(lookup(shift_right(bytes1, 4 * s), table_lo, table_hi), scale1);
          for (int m = 0; m < kA; ++m) {
            Vec x = vload(a + m * kChunkGroups * kGroup + s * kLanes);
            asm("" : "+v"(x));  // one load for both products (GCC would fold it into each FMA: twice the loads)
            acc0[m] = fmadd(w0, x, acc0[m]);
            acc1[m] = fmadd(w1, x, acc1[m]);
          }
        }
      }
      for (int m = 0; m < kA; ++m) {
        partial[r][m] = acc0[m];
        if (r1 != r) partial[r1][m] = acc1[m];
      }
    }
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int m = 0; m < kA; ++m) out[m * N + n0 + r] = hsum(partial[r][m]);
}

// M >= kBlockA rows of A over rows [n_begin, n_end) of W: kBlockA at a time with gemm_rows_blocked, the rest with
// gemv_rows, per chunk of kBlockRows rows of W. Apart from gemv so that gemv's few-row loop compiles as before (inlined
// into it, the M = 1 row read 15% slower).
__attribute__((noinline)) static void gemv_blocked(const float* A, int64_t M, int64_t K, const uint8_t* packed,
                                                   const Absmax4bit& absmax, int64_t blocksize, const float table[16],
                                                   float* out, int64_t N, int64_t n_begin, int64_t n_end) {
  std::vector<float> row_scales(static_cast<size_t>(kBlockRows * (K / blocksize + 2)));
  const VecI lane_block = lane_blocks(blocksize < kGroup ? blocksize / 8 : kLanes);
  const int shift = log2_of(blocksize);
  const int64_t stride = K / blocksize + 2;
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kBlockRows) {
    const int64_t n1 = std::min(n_end, n0 + kBlockRows);
    for (int64_t n = n0; n < n1; ++n)  // once per chunk of W, for every block of rows of A
      decode_absmax(absmax, (n * K) >> shift, ((n * K + K - 1) >> shift) + 1, row_scales.data() + (n - n0) * stride);
    int64_t m = 0;
    for (; m + kBlockA <= M; m += kBlockA)
      gemm_rows_blocked<kBlockA>(A + m * K, K, packed, blocksize, table, lane_block, row_scales.data(), out + m * N, N,
                                 n0, n1);
    // the rest (gemv_rows decodes each row's scales again, into the start of row_scales: after the blocks above)
    gemv_rows_from(m, A, M, K, packed, absmax, blocksize, table, row_scales.data(), out, N, n0, n1);
  }
}

static void gemv(const float* A, int64_t M, int64_t K, const uint8_t* packed, const Absmax4bit& absmax,
                 int64_t blocksize, QuantType quant_type, float* out, int64_t N, int64_t n_begin, int64_t n_end) {
  if (!simd_layout(K)) {
    gemv_generic(A, M, K, packed, absmax, blocksize, quant_type, out, N, n_begin, n_end);
    return;
  }
  alignas(64) float table[16];
  fill_code_table(quant_type, table);
  if (M >= kBlockA) {
    gemv_blocked(A, M, K, packed, absmax, blocksize, table, out, N, n_begin, n_end);
    return;
  }
  std::vector<float> row_scales(static_cast<size_t>(K / blocksize + 2));
  // Rows of W in chunks that stay in L1 while up to 4 rows of A pass over them.
  constexpr int64_t kChunk = 16;
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kChunk) {
    const int64_t n1 = std::min(n_end, n0 + kChunk);
    gemv_rows_from(0, A, M, K, packed, absmax, blocksize, table, row_scales.data(), out, N, n0, n1);
  }
}
#else
static void gemv(const float* A, int64_t M, int64_t K, const uint8_t* packed, const Absmax4bit& absmax,
                 int64_t blocksize, QuantType quant_type, float* out, int64_t N, int64_t n_begin, int64_t n_end) {
  gemv_generic(A, M, K, packed, absmax, blocksize, quant_type, out, N, n_begin, n_end);
}
#endif

#if defined(__AVX512F__)
#include "gemm_4bit_amx.h"
#endif

}  // namespace BNBX_ISA

const Gemm4bitKernels BNBX_TABLE(gemm_4bit) = {
    BNBX_ISA_NAME,         &BNBX_ISA::pack_a,   &BNBX_ISA::gemv, &BNBX_ISA::decode_absmax,
#if defined(__AVX512F__)
    &BNBX_ISA::pack_x_amx, &BNBX_ISA::gemm_amx,
#else
    nullptr,       nullptr,
#endif
};

}  // namespace bnbx::cpu
