#pragma once

// fp32 -> bf16 round-to-nearest-even as float_to_bf16 does it: NaN -> 0x7fc0, everything else by integer
// rounding of the bit pattern. Lanes hold the 16-bit results zero-extended.
static inline __m512i bf16_bits_16(__m512 value) {
  const __m512i bits = _mm512_castps_si512(value);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded =
      _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  return _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(value, value, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
}

// fp32 -> fp16 round-to-nearest-even; vcvtps2ph keeps NaN payload bits, float_to_fp16 makes every NaN
// sign | 0x7e00, so NaN lanes are patched.
static inline __m256i fp16_bits_16(__m512 value) {
  const __m256i half = _mm512_cvtps_ph(value, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512i nan_bits =
      _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(_mm512_castps_si512(value), 16), _mm512_set1_epi32(0x8000)),
                      _mm512_set1_epi32(0x7e00));
  return _mm256_mask_mov_epi16(half, _mm512_cmp_ps_mask(value, value, _CMP_UNORD_Q), _mm512_cvtepi32_epi16(nan_bits));
}

// Stores 16 fp32 values at out[i] as kType, rounded as float_to_bf16 / float_to_fp16 round. kStream: a
// non-temporal store (write around the caches, for outputs too large to stay there), out + i aligned as
// stream_start gives.
template <FloatType kType, bool kStream = false>
static inline void store_16_from_float(void* out, int64_t i, __m512 value) {
  if constexpr (kType == FloatType::kFloat32) {
    float* to = static_cast<float*>(out) + i;
    if constexpr (kStream) {
      _mm512_stream_ps(to, value);
    } else {
      _mm512_storeu_ps(to, value);
    }
  } else {
    const __m256i bits =
        kType == FloatType::kFloat16 ? fp16_bits_16(value) : _mm512_cvtepi32_epi16(bf16_bits_16(value));
    __m256i* to = reinterpret_cast<__m256i*>(static_cast<uint16_t*>(out) + i);
    if constexpr (kStream) {
      _mm256_stream_si256(to, bits);
    } else {
      _mm256_storeu_si256(to, bits);
    }
  }
}

// The first index from i (at most end) at which a streamed store of kType elements is aligned: 64 bytes for
// fp32 (a zmm), 32 for 16-bit types (a ymm).
template <FloatType kType>
static inline int64_t stream_start(const void* out, int64_t i, int64_t end) {
  constexpr int64_t kBytes = kType == FloatType::kFloat32 ? 4 : 2, kAlign = 16 * kBytes;
  const auto address = reinterpret_cast<uintptr_t>(out) + static_cast<uintptr_t>(i * kBytes);
  return std::min(end, i + static_cast<int64_t>((kAlign - address % kAlign) % kAlign) / kBytes);
}

template <FloatType kIn>
static inline __m512 load_16_as_float(const void* in, int64_t i) {
  if constexpr (kIn == FloatType::kFloat32) {
    return _mm512_loadu_ps(static_cast<const float*>(in) + i);
  } else {
    const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(in) + i));
    if constexpr (kIn == FloatType::kFloat16) return _mm512_cvtph_ps(half);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
  }
}

// Lanes outside `mask` read as +0 (masked loads do not touch memory there), which quantizes to the zero
// code, the padding of an odd last element.
template <FloatType kIn>
static inline __m512 load_16_as_float_masked(const void* in, int64_t i, __mmask16 mask) {
  if constexpr (kIn == FloatType::kFloat32) {
    return _mm512_maskz_loadu_ps(mask, static_cast<const float*>(in) + i);
  } else {
    const __m256i half = _mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(in) + i);
    if constexpr (kIn == FloatType::kFloat16) return _mm512_cvtph_ps(half);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
  }
}

static inline __mmask16 first_lanes_16(int64_t count) { return static_cast<__mmask16>((1u << count) - 1u); }

// Bit pattern of max |x| over in[start, end) as fp32; above 0x7f7fffff (FLT_MAX) when the block has a NaN
// or an Inf. 16-bit inputs are compared as 16-bit patterns (32 per vector), whose order is also the order
// of their values; the largest one is then converted exactly.
template <FloatType kIn>
static inline uint32_t block_absmax_bits(const void* in, int64_t start, int64_t end) {
  int64_t i = start;
  if constexpr (kIn == FloatType::kFloat32) {
    const float* src = static_cast<const float*>(in);
    const __m512i magnitude = _mm512_set1_epi32(0x7fffffff);
    __m512i max0 = _mm512_setzero_si512(), max1 = _mm512_setzero_si512();
    for (; i + 32 <= end; i += 32) {
      max0 = _mm512_max_epu32(max0, _mm512_and_si512(_mm512_loadu_si512(src + i), magnitude));
      max1 = _mm512_max_epu32(max1, _mm512_and_si512(_mm512_loadu_si512(src + i + 16), magnitude));
    }
    for (; i < end; i += 16) {
      const __m512i x = _mm512_maskz_loadu_epi32(first_lanes_16(std::min<int64_t>(16, end - i)), src + i);
      max0 = _mm512_max_epu32(max0, _mm512_and_si512(x, magnitude));
    }
    return _mm512_reduce_max_epu32(_mm512_max_epu32(max0, max1));
  } else {
    const uint16_t* src = static_cast<const uint16_t*>(in);
    const __m512i magnitude = _mm512_set1_epi16(0x7fff);
    __m512i max0 = _mm512_setzero_si512(), max1 = _mm512_setzero_si512();
    for (; i + 64 <= end; i += 64) {
      max0 = _mm512_max_epu16(max0, _mm512_and_si512(_mm512_loadu_si512(src + i), magnitude));
      max1 = _mm512_max_epu16(max1, _mm512_and_si512(_mm512_loadu_si512(src + i + 32), magnitude));
    }
    for (; i < end; i += 32) {
      const int64_t count = std::min<int64_t>(32, end - i);
      const __m512i x = _mm512_maskz_loadu_epi16(static_cast<__mmask32>((1ull << count) - 1), src + i);
      max0 = _mm512_max_epu16(max0, _mm512_and_si512(x, magnitude));
    }
    const __m512i max512 = _mm512_max_epu16(max0, max1);
    const __m256i max256 = _mm256_max_epu16(_mm512_castsi512_si256(max512), _mm512_extracti64x4_epi64(max512, 1));
    const __m128i max128 = _mm_max_epu16(_mm256_castsi256_si128(max256), _mm256_extracti128_si256(max256, 1));
    // the largest of 8 = the complement of the smallest complement (phminposuw)
    const uint16_t bits =
        static_cast<uint16_t>(~_mm_cvtsi128_si32(_mm_minpos_epu16(_mm_xor_si128(max128, _mm_set1_epi32(-1)))));
    if constexpr (kIn == FloatType::kBFloat16) return static_cast<uint32_t>(bits) << 16;
    return bits > 0x7bffu ? 0xffffffffu : float_to_bits(fp16_to_float(bits));
  }
}
