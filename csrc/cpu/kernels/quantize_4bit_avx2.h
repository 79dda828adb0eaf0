#pragma once

// Pivot tables of the binary searches, indexed by the code prefix so far (p = code >> step_bits).
// NF4: 15 thresholds, steps 8, 4, 2, 1; FP4: 7 magnitude thresholds, steps 4, 2, 1, then the sign.
struct CodeSearch {
  __m256 pivot;          // first level, every lane
  __m256 pivots_level2;  // [p] = threshold 2p * step + step - 1 at the second level, and so on
  __m256 pivots_level3;
  __m256 pivots_level4;  // NF4 only
  __m256i fp4_codes;     // FP4 only: [bucket] -> code
};

template <QuantType kQuant>
static inline CodeSearch make_code_search() {
  alignas(32) float level2[8] = {}, level3[8] = {}, level4[8] = {};
  alignas(32) int32_t fp4_codes[8];
  for (int p = 0; p < 8; ++p) fp4_codes[p] = kFP4BucketToCode[p];
  if constexpr (kQuant == QuantType::kNF4) {
    for (int p = 0; p < 2; ++p) level2[p] = kNF4Thresholds[8 * p + 3];
    for (int p = 0; p < 4; ++p) level3[p] = kNF4Thresholds[4 * p + 1];
    for (int p = 0; p < 8; ++p) level4[p] = kNF4Thresholds[2 * p];
    return {_mm256_set1_ps(kNF4Thresholds[7]), _mm256_load_ps(level2), _mm256_load_ps(level3), _mm256_load_ps(level4),
            _mm256_load_si256(reinterpret_cast<const __m256i*>(fp4_codes))};
  } else {
    for (int p = 0; p < 2; ++p) level2[p] = kFP4Thresholds[4 * p + 1];
    for (int p = 0; p < 4; ++p) level3[p] = kFP4Thresholds[2 * p];
    return {_mm256_set1_ps(kFP4Thresholds[3]), _mm256_load_ps(level2), _mm256_load_ps(level3), _mm256_setzero_ps(),
            _mm256_load_si256(reinterpret_cast<const __m256i*>(fp4_codes))};
  }
}

// One search level: prefix = 2 * prefix + (x > pivot[prefix]); a true compare is all ones (-1).
static inline __m256i search_step(__m256 x, __m256 pivots, __m256i prefix) {
  const __m256 greater = _mm256_cmp_ps(x, _mm256_permutevar8x32_ps(pivots, prefix), _CMP_GT_OQ);
  return _mm256_sub_epi32(_mm256_add_epi32(prefix, prefix), _mm256_castps_si256(greater));
}

// 8 codes (one per 32-bit lane) of values already scaled by 1/absmax.
template <QuantType kQuant>
static inline __m256i codes_8(__m256 x, const CodeSearch& search) {
  if constexpr (kQuant == QuantType::kNF4) {
    __m256i code = _mm256_srli_epi32(_mm256_castps_si256(_mm256_cmp_ps(x, search.pivot, _CMP_GT_OQ)), 31);
    code = search_step(x, search.pivots_level2, code);
    code = search_step(x, search.pivots_level3, code);
    return search_step(x, search.pivots_level4, code);
  } else {
    // |x| by clearing the sign: -0 becomes +0, which compares like -0 against the positive thresholds
    const __m256 magnitude =
        _mm256_castsi256_ps(_mm256_and_si256(_mm256_castps_si256(x), _mm256_set1_epi32(0x7fffffff)));
    const __m256i negative = _mm256_castps_si256(_mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ));
    __m256i bucket = _mm256_srli_epi32(_mm256_castps_si256(_mm256_cmp_ps(magnitude, search.pivot, _CMP_GT_OQ)), 31);
    bucket = search_step(magnitude, search.pivots_level2, bucket);
    bucket = search_step(magnitude, search.pivots_level3, bucket);
    return _mm256_or_si256(_mm256_permutevar8x32_epi32(search.fp4_codes, bucket),
                           _mm256_and_si256(negative, _mm256_set1_epi32(8)));
  }
}

// 32 codes (4 x 8 lanes, in element order) -> 16 bytes.
static inline __m128i pack_32_codes(__m256i c0, __m256i c1, __m256i c2, __m256i c3) {
  // In-lane packs: 128-bit lane k ends up holding the codes of elements 4k..4k+3 of c0, c1, c2, c3 (bytes).
  const __m256i bytes = _mm256_packus_epi16(_mm256_packus_epi32(c0, c1), _mm256_packus_epi32(c2, c3));
  // (even, odd) byte pairs -> 16 * even + odd: the packed byte, in a 16-bit lane
  const __m256i pairs = _mm256_maddubs_epi16(bytes, _mm256_set1_epi16(0x0110));
  // 32-bit lane (k, c) holds the two bytes of elements 4k..4k+3 of vector c; put them in element order
  const __m256i ordered = _mm256_permutevar8x32_epi32(pairs, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  return _mm_packus_epi16(_mm256_castsi256_si128(ordered), _mm256_extracti128_si256(ordered, 1));
}

// Codes of one finite block in[start, end) (start even) with its scale; kPrescale as in the AVX-512 path.
template <FloatType kIn, QuantType kQuant, bool kPrescale>
static inline void quantize_4bit_block_codes_scaled(const void* in, int64_t start, int64_t end, BlockScale scale,
                                                    const CodeSearch& search, uint8_t* packed) {
  const __m256 prescale = _mm256_set1_ps(scale.prescale);
  const __m256 inv_absmax = _mm256_set1_ps(scale.inv_absmax);
  auto scaled = [&](__m256 x) { return _mm256_mul_ps(kPrescale ? _mm256_mul_ps(x, prescale) : x, inv_absmax); };
  int64_t i = start;
  if constexpr (kIn == FloatType::kBFloat16) {
    // 32-bit lane j of a 32-byte load holds elements 2j (low half) and 2j+1 (high half): shifting or
    // masking gives the even and the odd elements as fp32, whose codes are the byte's two nibbles.
    const __m256i high_half = _mm256_set1_epi32(static_cast<int32_t>(0xffff0000u));
    const uint16_t* src = static_cast<const uint16_t*>(in);
    for (; i + 32 <= end; i += 32) {
      __m256i bytes[2];
      for (int half = 0; half < 2; ++half) {
        const __m256i pairs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i + 16 * half));
        const __m256 even = _mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16));
        const __m256 odd = _mm256_castsi256_ps(_mm256_and_si256(pairs, high_half));
        bytes[half] = _mm256_or_si256(_mm256_slli_epi32(codes_8<kQuant>(scaled(even), search), 4),
                                      codes_8<kQuant>(scaled(odd), search));
      }
      // 16 byte values in 32-bit lanes -> 16 bytes; the in-lane packs leave 4-byte groups to reorder
      const __m256i packed_bytes = _mm256_packus_epi16(_mm256_packus_epi32(bytes[0], bytes[1]), _mm256_setzero_si256());
      const __m256i ordered = _mm256_permutevar8x32_epi32(packed_bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(packed + i / 2), _mm256_castsi256_si128(ordered));
    }
  }
  for (; i + 32 <= end; i += 32) {
    const __m256i c0 = codes_8<kQuant>(scaled(load_8_as_float<kIn>(in, i)), search);
    const __m256i c1 = codes_8<kQuant>(scaled(load_8_as_float<kIn>(in, i + 8)), search);
    const __m256i c2 = codes_8<kQuant>(scaled(load_8_as_float<kIn>(in, i + 16)), search);
    const __m256i c3 = codes_8<kQuant>(scaled(load_8_as_float<kIn>(in, i + 24)), search);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(packed + i / 2), pack_32_codes(c0, c1, c2, c3));
  }
  quantize_4bit_range<kIn>(in, i, end, scale, kQuant, packed);
}

template <FloatType kIn, QuantType kQuant>
static inline void quantize_4bit_block_codes(const void* in, int64_t start, int64_t end, BlockScale scale,
                                             const CodeSearch& search, uint8_t* packed) {
  if (scale.prescale == 1.0f) {
    quantize_4bit_block_codes_scaled<kIn, kQuant, false>(in, start, end, scale, search, packed);
  } else {
    quantize_4bit_block_codes_scaled<kIn, kQuant, true>(in, start, end, scale, search, packed);
  }
}

// Lane-wise max of |x| bit patterns over one full block (16 16-bit or 8 32-bit lanes); the block is a
// multiple of 32 bytes (blocksize >= 32).
template <FloatType kIn>
static inline __m256i block_max_lanes(const void* in, int64_t start, int64_t blocksize) {
  const char* bytes = static_cast<const char*>(in) + start * static_cast<int64_t>(kIn == FloatType::kFloat32 ? 4 : 2);
  const int64_t vectors = blocksize * (kIn == FloatType::kFloat32 ? 4 : 2) / 32;
  const __m256i magnitude = kIn == FloatType::kFloat32 ? _mm256_set1_epi32(0x7fffffff) : _mm256_set1_epi16(0x7fff);
  __m256i max = _mm256_setzero_si256();
  for (int64_t v = 0; v < vectors; ++v) {
    const __m256i x = _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes + 32 * v)), magnitude);
    max = kIn == FloatType::kFloat32 ? _mm256_max_epu32(max, x) : _mm256_max_epu16(max, x);
  }
  return max;
}

// 8 blocks' lane-wise maxima -> one vector of their absmax bit patterns (as fp32), in block order; above
// 0x7f7fffff (and at most 0x7fffffff) for a block with a NaN or an Inf. A transposing tree, as in AVX-512.
template <FloatType kIn>
static inline __m256i reduce_8_blocks(__m256i lanes[8]) {
  auto max = [](__m256i a, __m256i b) {
    return kIn == FloatType::kFloat32 ? _mm256_max_epu32(a, b) : _mm256_max_epu16(a, b);
  };
  // 256 -> 128 bits per block: vector k = [block 2k | block 2k+1]
  for (int k = 0; k < 4; ++k) {
    lanes[k] = max(_mm256_permute2x128_si256(lanes[2 * k], lanes[2 * k + 1], 0x20),
                   _mm256_permute2x128_si256(lanes[2 * k], lanes[2 * k + 1], 0x31));
  }
  // 128 -> 64: 128-bit lane l of vector k = [block 4k + l, block 4k + 2 + l]
  for (int k = 0; k < 2; ++k) {
    lanes[k] = max(_mm256_unpacklo_epi64(lanes[2 * k], lanes[2 * k + 1]),
                   _mm256_unpackhi_epi64(lanes[2 * k], lanes[2 * k + 1]));
  }
  // 64 -> 32: 32-bit lane 4l + m = block l + 2m
  const __m256 first = _mm256_castsi256_ps(lanes[0]), second = _mm256_castsi256_ps(lanes[1]);
  __m256i bits = max(_mm256_castps_si256(_mm256_shuffle_ps(first, second, _MM_SHUFFLE(2, 0, 2, 0))),
                     _mm256_castps_si256(_mm256_shuffle_ps(first, second, _MM_SHUFFLE(3, 1, 3, 1))));
  bits = _mm256_permutevar8x32_epi32(bits, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  if constexpr (kIn == FloatType::kFloat32) return bits;
  // 32 -> 16: the larger 16-bit half, then converted to fp32 bits (exact)
  const __m256i half = _mm256_and_si256(_mm256_max_epu16(bits, _mm256_srli_epi32(bits, 16)), _mm256_set1_epi32(0xffff));
  if constexpr (kIn == FloatType::kBFloat16) return _mm256_slli_epi32(half, 16);
  const __m256i widened = _mm256_castps_si256(
      _mm256_cvtph_ps(_mm_packus_epi32(_mm256_castsi256_si128(half), _mm256_extracti128_si256(half, 1))));
  return _mm256_blendv_epi8(widened, _mm256_set1_epi32(0x7fffffff),
                            _mm256_cmpgt_epi32(half, _mm256_set1_epi32(0x7bff)));
}

template <FloatType kIn, QuantType kQuant>
static void quantize_4bit_blocks_simd(const void* in, int64_t n, int64_t blocksize, uint8_t* packed, float* absmax,
                                      int64_t block_begin, int64_t block_end) {
  const CodeSearch search = make_code_search<kQuant>();
  int64_t block = block_begin;
  // Small blocks, 8 at a time: absmax, the non-finite test and block_scale as vector operations.
  constexpr int64_t kGroup = 8;
  if (blocksize <= 256) {
    for (; block + kGroup <= block_end && (block + kGroup) * blocksize <= n; block += kGroup) {
      __m256i lanes[kGroup];
      prefetch_ahead<kIn>(in, block * blocksize, kGroup * blocksize);
      for (int b = 0; b < kGroup; ++b) lanes[b] = block_max_lanes<kIn>(in, (block + b) * blocksize, blocksize);
      const __m256i bits = reduce_8_blocks<kIn>(lanes);  // <= 0x7fffffff: signed compares are safe
      const __m256 block_max = _mm256_castsi256_ps(bits);
      const __m256i nonfinite = _mm256_cmpgt_epi32(bits, _mm256_set1_epi32(0x7f7fffff));
      _mm256_storeu_ps(absmax + block,
                       _mm256_blendv_ps(block_max, _mm256_set1_ps(std::numeric_limits<float>::quiet_NaN()),
                                        _mm256_castsi256_ps(nonfinite)));
      // block_scale, lane-wise: the same operations on the same values (a zero block divides 1 by 1, unused)
      const __m256 zero = _mm256_castsi256_ps(_mm256_cmpeq_epi32(bits, _mm256_setzero_si256()));
      const __m256 subnormal =
          _mm256_andnot_ps(zero, _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(0x00800000), bits)));
      const __m256 one = _mm256_set1_ps(1.0f);
      const __m256 prescale = _mm256_blendv_ps(one, _mm256_set1_ps(18446744073709551616.0f), subnormal);
      const __m256 inv_absmax =
          _mm256_andnot_ps(zero, _mm256_div_ps(one, _mm256_blendv_ps(_mm256_mul_ps(block_max, prescale), one, zero)));
      alignas(32) float prescales[kGroup], inv_absmaxes[kGroup];
      _mm256_store_ps(prescales, prescale);
      _mm256_store_ps(inv_absmaxes, inv_absmax);
      const int nonfinite_blocks = _mm256_movemask_ps(_mm256_castsi256_ps(nonfinite));
      for (int b = 0; b < kGroup; ++b) {
        const int64_t start = (block + b) * blocksize;
        if ((nonfinite_blocks >> b) & 1) {
          const uint8_t zero_byte = zero_code(kQuant);
          std::memset(packed + start / 2, zero_byte << 4 | zero_byte, static_cast<size_t>(blocksize / 2));
          continue;
        }
        quantize_4bit_block_codes<kIn, kQuant>(in, start, start + blocksize, {prescales[b], inv_absmaxes[b]}, search,
                                               packed);
      }
    }
  }
  for (; block < block_end; ++block) {
    const int64_t start = block * blocksize;
    const int64_t end = std::min(n, start + blocksize);
    prefetch_ahead<kIn>(in, start, end - start);
    const uint32_t max_bits = block_absmax_bits<kIn>(in, start, end);
    if (max_bits > 0x7f7fffffu) {
      store_nonfinite_block(block, start, end, kQuant, packed, absmax);
      continue;
    }
    const float block_max = bits_to_float(max_bits);
    absmax[block] = block_max;
    quantize_4bit_block_codes<kIn, kQuant>(in, start, end, block_scale(block_max), search, packed);
  }
}

// kStream: full 32-byte chunks go out with non-temporal stores (the caller checked the alignment).
template <FloatType kOut, bool kStream>
static void dequantize_4bit_blocks_simd(const uint8_t* packed, const float* absmax, int64_t n, int64_t blocksize,
                                        QuantType quant_type, void* out, int64_t block_begin, int64_t block_end) {
  alignas(32) float table[16];
  fill_code_table(quant_type, table);
  const __m256 codes_low = _mm256_load_ps(table), codes_high = _mm256_load_ps(table + 8);
  const __m128i nibble = _mm_set1_epi8(0x0f);
  for (int64_t block = block_begin; block < block_end; ++block) {
    const int64_t start = block * blocksize;
    const int64_t end = std::min(n, start + blocksize);
    const float block_max = absmax[block];
    const __m256 values_low = _mm256_mul_ps(codes_low, _mm256_set1_ps(block_max));
    const __m256 values_high = _mm256_mul_ps(codes_high, _mm256_set1_ps(block_max));
    int64_t i = start;
    if constexpr (kOut == FloatType::kFloat32) {
      float* dst = static_cast<float*>(out);
      for (; i + 16 <= end; i += 16) {
        // 8 packed bytes -> 16 nibble indices in element order (high nibble first)
        const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(packed + i / 2));
        const __m128i index =
            _mm_unpacklo_epi8(_mm_and_si128(_mm_srli_epi16(bytes, 4), nibble), _mm_and_si128(bytes, nibble));
        for (int half = 0; half < 2; ++half) {
          const __m256i lanes = _mm256_cvtepu8_epi32(half == 0 ? index : _mm_srli_si128(index, 8));
          // permutevar8x32 reads 3 index bits; bit 3, moved to the sign, picks the high half of the table
          const __m256 value = _mm256_blendv_ps(_mm256_permutevar8x32_ps(values_low, lanes),
                                                _mm256_permutevar8x32_ps(values_high, lanes),
                                                _mm256_castsi256_ps(_mm256_slli_epi32(lanes, 28)));
          if constexpr (kStream) {
            _mm256_stream_ps(dst + i + 8 * half, value);
          } else {
            _mm256_storeu_ps(dst + i + 8 * half, value);
          }
        }
      }
    } else {
      uint16_t* dst = static_cast<uint16_t*>(out);
      __m256i rounded;  // the 16 rounded products as 16-bit values, in order
      if constexpr (kOut == FloatType::kFloat16) {
        rounded = _mm256_set_m128i(fp16_bits_8(values_high), fp16_bits_8(values_low));
      } else {
        rounded =
            _mm256_permute4x64_epi64(_mm256_packus_epi32(bf16_bits_8(values_low), bf16_bits_8(values_high)), 0xd8);
      }
      // pshufb tables: the low bytes and the high bytes of the 16 results, in both 128-bit lanes
      const __m256i split =
          _mm256_shuffle_epi8(rounded, _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15, 0, 2, 4,
                                                        6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15));
      const __m256i low_bytes = _mm256_permute4x64_epi64(split, 0x88);
      const __m256i high_bytes = _mm256_permute4x64_epi64(split, 0xdd);
      for (; i + 32 <= end; i += 32) {
        const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + i / 2));
        const __m128i even = _mm_and_si128(_mm_srli_epi16(bytes, 4), nibble), odd = _mm_and_si128(bytes, nibble);
        const __m256i index = _mm256_set_m128i(_mm_unpackhi_epi8(even, odd), _mm_unpacklo_epi8(even, odd));
        const __m256i low = _mm256_shuffle_epi8(low_bytes, index), high = _mm256_shuffle_epi8(high_bytes, index);
        // unpack works per 128-bit lane: [0-7 | 16-23] and [8-15 | 24-31]
        const __m256i first = _mm256_unpacklo_epi8(low, high), second = _mm256_unpackhi_epi8(low, high);
        const __m256i low_half = _mm256_permute2x128_si256(first, second, 0x20);
        const __m256i high_half = _mm256_permute2x128_si256(first, second, 0x31);
        if constexpr (kStream) {
          _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i), low_half);
          _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i + 16), high_half);
        } else {
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), low_half);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i + 16), high_half);
        }
      }
    }
    dequantize_4bit_range<kOut>(packed, table, block_max, i, end, out);
  }
}
