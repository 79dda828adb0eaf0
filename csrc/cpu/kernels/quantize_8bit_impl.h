// 8-bit blockwise quantize / dequantize with a 256-entry code (the signed dynamic map by default), compiled
// once per instruction set (see quantize_8bit.h). C++ twin of tests/reference.py::quantize_blockwise_ref.
#include "isa_unit.h"
#include "quantize_8bit.h"

namespace bnbx::cpu {
namespace BNBX_ISA {

#include "simd.h"

// The code of one scaled value: dynamic_code_index (common/rules.h), bitsandbytes' CUDA search; the code is
// sorted (checked by the host code).

template <FloatType kIn>
static void quantize_blockwise_generic(const void* in, int64_t n, int64_t blocksize, const float* code, uint8_t* out,
                                       float* absmax, int64_t block_begin, int64_t block_end) {
  const uint8_t zero = dynamic_code_index(code, 0.0f);
  for (int64_t block = block_begin; block < block_end; ++block) {
    const int64_t start = block * blocksize;
    const int64_t end = std::min(n, start + blocksize);
    bool nonfinite = false;
    const float block_max = block_absmax<kIn>(in, start, end, &nonfinite);
    if (nonfinite) {
      absmax[block] = std::numeric_limits<float>::quiet_NaN();
      for (int64_t i = start; i < end; ++i) out[i] = zero;
      continue;
    }
    absmax[block] = block_max;
    const BlockScale scale = block_scale(block_max);
    for (int64_t i = start; i < end; ++i) {
      out[i] = dynamic_code_index(code, load_as_float<kIn>(in, i) * scale.prescale * scale.inv_absmax);
    }
  }
}

template <FloatType kOut>
static void dequantize_blockwise_generic(const uint8_t* in, const float* absmax, const float* code, int64_t n,
                                         int64_t blocksize, void* out, int64_t block_begin, int64_t block_end) {
  for (int64_t block = block_begin; block < block_end; ++block) {
    const int64_t start = block * blocksize;
    const int64_t end = std::min(n, start + blocksize);
    const float block_max = absmax[block];
    for (int64_t i = start; i < end; ++i) store_from_float<kOut>(out, i, code[in[i]] * block_max);
  }
}

// AVX-512, 16-bit outputs of blocks of >= 256 elements: the block's 256 products code[q] * absmax, each
// rounded once (bit-identical to store_from_float, NaN included: simd_avx512.h), form a
// 256-entry table of 16-bit results, looked up 32 at a time with vpermt2w (64 entries each) and two blend
// levels on index bits 6 and 7. Smaller blocks would spend more on the table than on the lookups, fp32
// outputs are bound by their 4-byte stores, and gathers are slower than the generic loop on AMD Zen, so
// those cases, AVX2 and the scalar build use the generic loop.
#if defined(__AVX512F__)
template <FloatType kOut>
static void dequantize_blockwise_simd(const uint8_t* in, const float* absmax, const float* code, int64_t n,
                                      int64_t blocksize, void* out, int64_t block_begin, int64_t block_end) {
  if constexpr (kOut == FloatType::kFloat32) {
    return dequantize_blockwise_generic<kOut>(in, absmax, code, n, blocksize, out, block_begin, block_end);
  } else {
    if (blocksize < 256 || denormals_flushed()) {
      return dequantize_blockwise_generic<kOut>(in, absmax, code, n, blocksize, out, block_begin, block_end);
    }
    __m512 codes[16];
    for (int j = 0; j < 16; ++j) codes[j] = _mm512_loadu_ps(code + 16 * j);
    uint16_t* dst = static_cast<uint16_t*>(out);
    for (int64_t block = block_begin; block < block_end; ++block) {
      const int64_t start = block * blocksize;
      const int64_t end = std::min(n, start + blocksize);
      const __m512 block_max = _mm512_set1_ps(absmax[block]);
      __m512i table[8];  // table[j]: the rounded results of codes 32j .. 32j + 31
      for (int j = 0; j < 8; ++j) {
        __m256i halves[2];
        for (int h = 0; h < 2; ++h) {
          const __m512 value = _mm512_mul_ps(codes[2 * j + h], block_max);
          halves[h] = kOut == FloatType::kFloat16 ? fp16_bits_16(value) : _mm512_cvtepi32_epi16(bf16_bits_16(value));
        }
        table[j] = _mm512_inserti64x4(_mm512_castsi256_si512(halves[0]), halves[1], 1);
      }
      for (int64_t i = start; i < end; i += 32) {
        const int64_t count = std::min<int64_t>(32, end - i);
        const __mmask32 lanes = static_cast<__mmask32>((1ull << count) - 1);
        const __m512i index = _mm512_cvtepu8_epi16(_mm256_maskz_loadu_epi8(lanes, in + i));
        const __mmask32 bit6 = _mm512_test_epi16_mask(index, _mm512_set1_epi16(64));
        const __mmask32 bit7 = _mm512_test_epi16_mask(index, _mm512_set1_epi16(128));
        const __m512i low = _mm512_mask_blend_epi16(bit6, _mm512_permutex2var_epi16(table[0], index, table[1]),
                                                    _mm512_permutex2var_epi16(table[2], index, table[3]));
        const __m512i high = _mm512_mask_blend_epi16(bit6, _mm512_permutex2var_epi16(table[4], index, table[5]),
                                                     _mm512_permutex2var_epi16(table[6], index, table[7]));
        _mm512_mask_storeu_epi16(dst + i, lanes, _mm512_mask_blend_epi16(bit7, low, high));
      }
    }
  }
}
#endif

// SIMD quantize: dynamic_code_index, 16 or 8 lanes at a time, with the same probes. Its 7 search steps
// probe code[index + s - 1] for s = 128, 64, ..., 2 (index = the even pivot reached so far, starting at 0;
// the rule's pivot 127 + 64 + ... is this index + s - 1): one of 128 / s values at each level, looked up by
// permutes from per-level tables (AVX-512) or, for the large levels, gathered (AVX2). The final midpoint
// test of the rule is
//   index + (x > upper_mid[index]) - (x < lower_mid[index])
// with upper_mid = (code[index + 1] + code[index]) * 0.5f and lower_mid = (code[index - 1] + code[index]) *
// 0.5f (-inf at index 0): for a sorted code lower_mid <= code[index] <= upper_mid (or a midpoint is NaN,
// which compares false), so at most one of the two tests holds, the one of the rule's branch. absmax and
// the scale are simd.h's and rules.h's, which give block_absmax/block_scale's results.
#if defined(__AVX512F__) || defined(__AVX2__)
// pivots[2^L + k] = the k-th probe of level L (step 128 >> L), L = 1..6, read from the code.
static inline void fill_level_pivots(const float* code, float pivots[128]) {
  pivots[0] = pivots[1] = 0.0f;
  for (int level = 1; level < 7; ++level) {
    const int step = 128 >> level;
    for (int k = 0; k < (1 << level); ++k) pivots[(1 << level) + k] = code[k * 2 * step + step - 1];
  }
}

// The final test's midpoints by pivot: [k] for index 2k.
static inline void fill_final_midpoints(const float* code, float upper[128], float lower[128]) {
  for (int k = 0; k < 128; ++k) {
    upper[k] = (code[2 * k + 1] + code[2 * k]) * 0.5f;
    lower[k] = k == 0 ? -std::numeric_limits<float>::infinity() : (code[2 * k - 1] + code[2 * k]) * 0.5f;
  }
}
#endif

#if defined(__AVX512F__)
// A 128-entry fp32 table in 8 vectors, looked up by a 7-bit index (permutex2var reads 5 bits, two blend
// levels the other two).
static inline __m512 lookup_128(const __m512 table[8], __m512i index) {
  const __mmask16 bit5 = _mm512_test_epi32_mask(index, _mm512_set1_epi32(32));
  const __mmask16 bit6 = _mm512_test_epi32_mask(index, _mm512_set1_epi32(64));
  const __m512 low = _mm512_mask_blend_ps(bit5, _mm512_permutex2var_ps(table[0], index, table[1]),
                                          _mm512_permutex2var_ps(table[2], index, table[3]));
  const __m512 high = _mm512_mask_blend_ps(bit5, _mm512_permutex2var_ps(table[4], index, table[5]),
                                           _mm512_permutex2var_ps(table[6], index, table[7]));
  return _mm512_mask_blend_ps(bit6, low, high);
}

template <FloatType kIn>
static void quantize_blockwise_simd(const void* in, int64_t n, int64_t blocksize, const float* code, uint8_t* out,
                                    float* absmax, int64_t block_begin, int64_t block_end) {
  if (denormals_flushed()) {
    return quantize_blockwise_generic<kIn>(in, n, blocksize, code, out, absmax, block_begin, block_end);
  }
  alignas(64) float pivots[128], upper_mid[128], lower_mid[128];
  fill_level_pivots(code, pivots);
  fill_final_midpoints(code, upper_mid, lower_mid);
  const uint8_t zero = dynamic_code_index(code, 0.0f);
  const __m512 pivot0 = _mm512_set1_ps(code[127]);
  // levels 1..4 fit one vector (the lanes past 2^L hold other levels' pivots and are never indexed)
  const __m512 level1 = _mm512_load_ps(pivots), level2 = _mm512_load_ps(pivots), level3 = _mm512_loadu_ps(pivots + 8);
  const __m512 level4 = _mm512_load_ps(pivots + 16);
  __m512 level5[2], level6[4], upper[8], lower[8];
  for (int j = 0; j < 2; ++j) level5[j] = _mm512_load_ps(pivots + 32 + 16 * j);
  for (int j = 0; j < 4; ++j) level6[j] = _mm512_load_ps(pivots + 64 + 16 * j);
  for (int j = 0; j < 8; ++j) upper[j] = _mm512_load_ps(upper_mid + 16 * j);
  for (int j = 0; j < 8; ++j) lower[j] = _mm512_load_ps(lower_mid + 16 * j);
  // level 1's pivots sit at offset 2, level 2's at 4: shift the prefix there instead of the table
  auto step = [](__m512i index, __m512 x, __m512 pivot, int size) {
    return _mm512_mask_add_epi32(index, _mm512_cmp_ps_mask(x, pivot, _CMP_GT_OQ), index, _mm512_set1_epi32(size));
  };
  auto search = [&](__m512 x) {
    __m512i index = _mm512_maskz_mov_epi32(_mm512_cmp_ps_mask(x, pivot0, _CMP_GT_OQ), _mm512_set1_epi32(128));
    index =
        step(index, x,
             _mm512_permutexvar_ps(_mm512_add_epi32(_mm512_srli_epi32(index, 7), _mm512_set1_epi32(2)), level1), 64);
    index =
        step(index, x,
             _mm512_permutexvar_ps(_mm512_add_epi32(_mm512_srli_epi32(index, 6), _mm512_set1_epi32(4)), level2), 32);
    index = step(index, x, _mm512_permutexvar_ps(_mm512_srli_epi32(index, 5), level3), 16);
    index = step(index, x, _mm512_permutexvar_ps(_mm512_srli_epi32(index, 4), level4), 8);
    __m512i prefix = _mm512_srli_epi32(index, 3);
    index = step(index, x, _mm512_permutex2var_ps(level5[0], prefix, level5[1]), 4);
    prefix = _mm512_srli_epi32(index, 2);
    const __mmask16 bit5_of_6 = _mm512_test_epi32_mask(prefix, _mm512_set1_epi32(32));
    index = step(index, x,
                 _mm512_mask_blend_ps(bit5_of_6, _mm512_permutex2var_ps(level6[0], prefix, level6[1]),
                                      _mm512_permutex2var_ps(level6[2], prefix, level6[3])),
                 2);
    prefix = _mm512_srli_epi32(index, 1);
    index = _mm512_mask_add_epi32(index, _mm512_cmp_ps_mask(x, lookup_128(upper, prefix), _CMP_GT_OQ), index,
                                  _mm512_set1_epi32(1));
    return _mm512_mask_sub_epi32(index, _mm512_cmp_ps_mask(x, lookup_128(lower, prefix), _CMP_LT_OQ), index,
                                 _mm512_set1_epi32(1));
  };
  for (int64_t block = block_begin; block < block_end; ++block) {
    const int64_t start = block * blocksize;
    const int64_t end = std::min(n, start + blocksize);
    const uint32_t max_bits = block_absmax_bits<kIn>(in, start, end);
    if (max_bits > 0x7f7fffffu) {
      absmax[block] = std::numeric_limits<float>::quiet_NaN();
      std::memset(out + start, zero, static_cast<size_t>(end - start));
      continue;
    }
    const float block_max = bits_to_float(max_bits);
    absmax[block] = block_max;
    const BlockScale scale = block_scale(block_max);
    const __m512 prescale = _mm512_set1_ps(scale.prescale), inv_absmax = _mm512_set1_ps(scale.inv_absmax);
    for (int64_t i = start; i < end; i += 16) {
      const __mmask16 lanes = first_lanes_16(std::min<int64_t>(16, end - i));
      const __m512 x = _mm512_mul_ps(_mm512_mul_ps(load_16_as_float_masked<kIn>(in, i, lanes), prescale), inv_absmax);
      _mm_mask_storeu_epi8(out + i, lanes, _mm512_cvtepi32_epi8(search(x)));
    }
  }
}
#elif defined(__AVX2__)
template <FloatType kIn>
static void quantize_blockwise_simd(const void* in, int64_t n, int64_t blocksize, const float* code, uint8_t* out,
                                    float* absmax, int64_t block_begin, int64_t block_end) {
  if (denormals_flushed()) {
    return quantize_blockwise_generic<kIn>(in, n, blocksize, code, out, absmax, block_begin, block_end);
  }
  alignas(32) float pivots[128], upper_mid[128], lower_mid[128];
  fill_level_pivots(code, pivots);
  fill_final_midpoints(code, upper_mid, lower_mid);
  const uint8_t zero = dynamic_code_index(code, 0.0f);
  const __m256 pivot0 = _mm256_set1_ps(code[127]);
  const __m256 level1 = _mm256_load_ps(pivots), level2 = _mm256_load_ps(pivots), level3 = _mm256_load_ps(pivots + 8);
  // one level: index += x > pivot ? size : 0 (a true compare is all ones)
  auto step = [](__m256i index, __m256 x, __m256 pivot, int size) {
    return _mm256_add_epi32(
        index, _mm256_and_si256(_mm256_castps_si256(_mm256_cmp_ps(x, pivot, _CMP_GT_OQ)), _mm256_set1_epi32(size)));
  };
  auto search = [&](__m256 x) {
    __m256i index = _mm256_and_si256(_mm256_castps_si256(_mm256_cmp_ps(x, pivot0, _CMP_GT_OQ)), _mm256_set1_epi32(128));
    index =
        step(index, x,
             _mm256_permutevar8x32_ps(level1, _mm256_add_epi32(_mm256_srli_epi32(index, 7), _mm256_set1_epi32(2))), 64);
    index =
        step(index, x,
             _mm256_permutevar8x32_ps(level2, _mm256_add_epi32(_mm256_srli_epi32(index, 6), _mm256_set1_epi32(4))), 32);
    index = step(index, x, _mm256_permutevar8x32_ps(level3, _mm256_srli_epi32(index, 5)), 16);
    for (int size = 8; size > 1; size >>= 1) {
      const __m256i probe = _mm256_add_epi32(index, _mm256_set1_epi32(size - 1));
      index = step(index, x, _mm256_i32gather_ps(code, probe, 4), size);
    }
    const __m256i pivot = _mm256_srli_epi32(index, 1);
    // + (x > upper) and - (x < lower): a true compare is -1
    index = _mm256_sub_epi32(
        index, _mm256_castps_si256(_mm256_cmp_ps(x, _mm256_i32gather_ps(upper_mid, pivot, 4), _CMP_GT_OQ)));
    return _mm256_add_epi32(
        index, _mm256_castps_si256(_mm256_cmp_ps(x, _mm256_i32gather_ps(lower_mid, pivot, 4), _CMP_LT_OQ)));
  };
  for (int64_t block = block_begin; block < block_end; ++block) {
    const int64_t start = block * blocksize;
    const int64_t end = std::min(n, start + blocksize);
    const uint32_t max_bits = block_absmax_bits<kIn>(in, start, end);
    if (max_bits > 0x7f7fffffu) {
      absmax[block] = std::numeric_limits<float>::quiet_NaN();
      std::memset(out + start, zero, static_cast<size_t>(end - start));
      continue;
    }
    const float block_max = bits_to_float(max_bits);
    absmax[block] = block_max;
    const BlockScale scale = block_scale(block_max);
    const __m256 prescale = _mm256_set1_ps(scale.prescale), inv_absmax = _mm256_set1_ps(scale.inv_absmax);
    int64_t i = start;
    for (; i + 8 <= end; i += 8) {
      const __m256i index = search(_mm256_mul_ps(_mm256_mul_ps(load_8_as_float<kIn>(in, i), prescale), inv_absmax));
      // 8 indices (< 256) in 32-bit lanes -> 8 bytes
      const __m256i bytes = _mm256_packus_epi16(_mm256_packus_epi32(index, index), _mm256_setzero_si256());
      const __m256i ordered = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(out + i), _mm256_castsi256_si128(ordered));
    }
    for (; i < end; ++i) {
      out[i] = dynamic_code_index(code, load_as_float<kIn>(in, i) * scale.prescale * scale.inv_absmax);
    }
  }
}
#endif

#if defined(__AVX512F__) || defined(__AVX2__)
#define BNBX_8BIT_QUANTIZE quantize_blockwise_simd
#else
#define BNBX_8BIT_QUANTIZE quantize_blockwise_generic
#endif

#if defined(__AVX512F__)
#define BNBX_8BIT_DEQUANTIZE dequantize_blockwise_simd
#else
#define BNBX_8BIT_DEQUANTIZE dequantize_blockwise_generic
#endif

static void quantize_blockwise(FloatType in_type, const void* in, int64_t n, int64_t blocksize, const float* code,
                               uint8_t* out, float* absmax, int64_t block_begin, int64_t block_end) {
  switch (in_type) {
    case FloatType::kFloat32:
      return BNBX_8BIT_QUANTIZE<FloatType::kFloat32>(in, n, blocksize, code, out, absmax, block_begin, block_end);
    case FloatType::kFloat16:
      return BNBX_8BIT_QUANTIZE<FloatType::kFloat16>(in, n, blocksize, code, out, absmax, block_begin, block_end);
    case FloatType::kBFloat16:
      return BNBX_8BIT_QUANTIZE<FloatType::kBFloat16>(in, n, blocksize, code, out, absmax, block_begin, block_end);
  }
}

static void dequantize_blockwise(FloatType out_type, const uint8_t* in, const float* absmax, const float* code,
                                 int64_t n, int64_t blocksize, void* out, int64_t block_begin, int64_t block_end) {
  switch (out_type) {
    case FloatType::kFloat32:
      return BNBX_8BIT_DEQUANTIZE<FloatType::kFloat32>(in, absmax, code, n, blocksize, out, block_begin, block_end);
    case FloatType::kFloat16:
      return BNBX_8BIT_DEQUANTIZE<FloatType::kFloat16>(in, absmax, code, n, blocksize, out, block_begin, block_end);
    case FloatType::kBFloat16:
      return BNBX_8BIT_DEQUANTIZE<FloatType::kBFloat16>(in, absmax, code, n, blocksize, out, block_begin, block_end);
  }
}

#undef BNBX_8BIT_DEQUANTIZE
#undef BNBX_8BIT_QUANTIZE

// Eight partial sums, whatever the instruction set: one chain of dependent double additions would run at a
// fraction of the speed, and the same grouping everywhere keeps the sum the same on every CPU.
static void nan_sum(const float* in, int64_t begin, int64_t end, double* sum, int64_t* count) {
  int64_t i = begin;
#if defined(__AVX512F__)
  __m512d partial = _mm512_setzero_pd();
  int64_t valid = 0;
  for (; i + 8 <= end; i += 8) {
    const __m256 x = _mm256_loadu_ps(in + i);
    const __mmask8 finite_or_inf = _mm256_cmp_ps_mask(x, x, _CMP_ORD_Q);  // not NaN
    partial = _mm512_mask_add_pd(partial, finite_or_inf, partial, _mm512_cvtps_pd(x));
    valid += __builtin_popcount(finite_or_inf);
  }
  alignas(64) double lanes[8];
  _mm512_store_pd(lanes, partial);
#else
  double lanes[8] = {};
  int64_t valid = 0;
  for (; i + 8 <= end; i += 8) {
    for (int lane = 0; lane < 8; ++lane) {
      const float x = in[i + lane];
      lanes[lane] += x == x ? static_cast<double>(x) : 0.0;
      valid += x == x ? 1 : 0;
    }
  }
#endif
  for (; i < end; ++i) {
    lanes[0] += in[i] == in[i] ? static_cast<double>(in[i]) : 0.0;
    valid += in[i] == in[i] ? 1 : 0;
  }
  *sum = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
  *count = valid;
}

}  // namespace BNBX_ISA

const Quantize8bitKernels BNBX_TABLE(quantize_8bit) = {BNBX_ISA_NAME, &BNBX_ISA::quantize_blockwise,
                                                       &BNBX_ISA::dequantize_blockwise, &BNBX_ISA::nan_sum};

}  // namespace bnbx::cpu
