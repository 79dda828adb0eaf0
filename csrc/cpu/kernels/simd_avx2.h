#pragma once

static inline __m256i bf16_bits_8(__m256 value) {
  const __m256i bits = _mm256_castps_si256(value);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded =
      _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  const __m256 nan = _mm256_cmp_ps(value, value, _CMP_UNORD_Q);
  return _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(nan));
}

static inline __m128i fp16_bits_8(__m256 value) {
  const __m128i half = _mm256_cvtps_ph(value, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256i nan_bits =
      _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(_mm256_castps_si256(value), 16), _mm256_set1_epi32(0x8000)),
                      _mm256_set1_epi32(0x7e00));
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(value, value, _CMP_UNORD_Q));
  // 32-bit lanes -> 16-bit lanes, in order (values fit: no saturation)
  const __m128i nan_bits16 = _mm_packus_epi32(_mm256_castsi256_si128(nan_bits), _mm256_extracti128_si256(nan_bits, 1));
  const __m128i nan16 = _mm_packs_epi32(_mm256_castsi256_si128(nan), _mm256_extracti128_si256(nan, 1));
  return _mm_blendv_epi8(half, nan_bits16, nan16);
}

// Stores 8 fp32 values at out[i] as kType, rounded as float_to_bf16 / float_to_fp16 round.
template <FloatType kType>
static inline void store_8_from_float(void* out, int64_t i, __m256 value) {
  if constexpr (kType == FloatType::kFloat32) {
    _mm256_storeu_ps(static_cast<float*>(out) + i, value);
  } else if constexpr (kType == FloatType::kFloat16) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(out) + i), fp16_bits_8(value));
  } else {
    const __m256i rounded = bf16_bits_8(value);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(out) + i),
                     _mm_packus_epi32(_mm256_castsi256_si128(rounded), _mm256_extracti128_si256(rounded, 1)));
  }
}

template <FloatType kIn>
static inline __m256 load_8_as_float(const void* in, int64_t i) {
  if constexpr (kIn == FloatType::kFloat32) {
    return _mm256_loadu_ps(static_cast<const float*>(in) + i);
  } else {
    const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(in) + i));
    if constexpr (kIn == FloatType::kFloat16) return _mm256_cvtph_ps(half);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
  }
}

// Bit pattern of max |x| over in[start, end) as fp32; above 0x7f7fffff (FLT_MAX) when the block has a NaN
// or an Inf. 16-bit inputs are compared as 16-bit patterns, as in the AVX-512 path.
template <FloatType kIn>
static inline uint32_t block_absmax_bits(const void* in, int64_t start, int64_t end) {
  int64_t i = start;
  if constexpr (kIn == FloatType::kFloat32) {
    const float* src = static_cast<const float*>(in);
    const __m256i magnitude = _mm256_set1_epi32(0x7fffffff);
    __m256i max0 = _mm256_setzero_si256(), max1 = _mm256_setzero_si256();
    for (; i + 16 <= end; i += 16) {
      max0 = _mm256_max_epu32(
          max0, _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i)), magnitude));
      max1 = _mm256_max_epu32(
          max1, _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i + 8)), magnitude));
    }
    const __m256i max256 = _mm256_max_epu32(max0, max1);
    __m128i max = _mm_max_epu32(_mm256_castsi256_si128(max256), _mm256_extracti128_si256(max256, 1));
    max = _mm_max_epu32(max, _mm_shuffle_epi32(max, 0x4e));
    max = _mm_max_epu32(max, _mm_shuffle_epi32(max, 0xb1));
    uint32_t bits = static_cast<uint32_t>(_mm_cvtsi128_si32(max));
    for (; i < end; ++i) bits = std::max(bits, float_to_bits(src[i]) & 0x7fffffffu);
    return bits;
  } else {
    const uint16_t* src = static_cast<const uint16_t*>(in);
    const __m256i magnitude = _mm256_set1_epi16(0x7fff);
    __m256i max0 = _mm256_setzero_si256(), max1 = _mm256_setzero_si256();
    for (; i + 32 <= end; i += 32) {
      max0 = _mm256_max_epu16(
          max0, _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i)), magnitude));
      max1 = _mm256_max_epu16(
          max1, _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i + 16)), magnitude));
    }
    const __m256i max256 = _mm256_max_epu16(max0, max1);
    const __m128i max128 = _mm_max_epu16(_mm256_castsi256_si128(max256), _mm256_extracti128_si256(max256, 1));
    // the largest of 8 = the complement of the smallest complement (phminposuw)
    uint16_t bits =
        static_cast<uint16_t>(~_mm_cvtsi128_si32(_mm_minpos_epu16(_mm_xor_si128(max128, _mm_set1_epi32(-1)))));
    for (; i < end; ++i) bits = std::max<uint16_t>(bits, src[i] & 0x7fffu);
    if constexpr (kIn == FloatType::kBFloat16) return static_cast<uint32_t>(bits) << 16;
    return bits > 0x7bffu ? 0xffffffffu : float_to_bits(fp16_to_float(bits));
  }
}
