// 8-bit blockwise quantize / dequantize with a 256-entry code (the signed dynamic map by default), compiled
// once per instruction set (see kernels.h). C++ twin of tests/reference.py::quantize_blockwise_ref.
#pragma once

// Nearest code: index = number of midpoints m with x > m (ties go to the lower code), the rule of
// bitsandbytes' torch.bucketize path. midpoints[i] = (code[i] + code[i+1]) / 2 in fp32; the code is sorted.
static inline uint8_t nearest_code_index(const float* midpoints, float x) {
  // branch-free binary search over 255 midpoints, padded to 256 with +inf at index 255
  int index = 0;
  for (int step = 128; step > 0; step >>= 1) index += (x > midpoints[index + step - 1]) ? step : 0;
  return static_cast<uint8_t>(index);
}

template <FloatType kIn>
static void quantize_blockwise_generic(const void* in, int64_t n, int64_t blocksize, const float* code,
                                       uint8_t* out, float* absmax, int64_t block_begin, int64_t block_end) {
  float midpoints[256];
  for (int i = 0; i < 255; ++i) midpoints[i] = (code[i] + code[i + 1]) / 2.0f;
  midpoints[255] = std::numeric_limits<float>::infinity();
  const uint8_t zero = nearest_code_index(midpoints, 0.0f);
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
      out[i] = nearest_code_index(midpoints, load_as_float<kIn>(in, i) * scale.prescale * scale.inv_absmax);
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
// rounded once (bit-identical to store_from_float, NaN included: quantize_4bit_impl.h's helpers), form a
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
    if (blocksize < 256) {
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

#if defined(__AVX512F__)
#define BNBX_8BIT_DEQUANTIZE dequantize_blockwise_simd
#else
#define BNBX_8BIT_DEQUANTIZE dequantize_blockwise_generic
#endif

static void quantize_blockwise(FloatType in_type, const void* in, int64_t n, int64_t blocksize, const float* code,
                               uint8_t* out, float* absmax, int64_t block_begin, int64_t block_end) {
  switch (in_type) {
    case FloatType::kFloat32:
      return quantize_blockwise_generic<FloatType::kFloat32>(in, n, blocksize, code, out, absmax, block_begin, block_end);
    case FloatType::kFloat16:
      return quantize_blockwise_generic<FloatType::kFloat16>(in, n, blocksize, code, out, absmax, block_begin, block_end);
    case FloatType::kBFloat16:
      return quantize_blockwise_generic<FloatType::kBFloat16>(in, n, blocksize, code, out, absmax, block_begin, block_end);
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
