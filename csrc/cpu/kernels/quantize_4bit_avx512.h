#pragma once

// Code lookup by cell: [-1, 1) is cut into 32 cells of width 1/16, and every cell holds at most one
// threshold of either type (the NF4 thresholds are >= 0.08 apart, the FP4 ones >= 0.083). The cell of x is
// floor(16 x), exact (a power-of-two scaling, then an exact floor); |16 x| is first clamped to 255/16 so that
// values at or beyond +-1 (x * (1 / absmax) can round to 1 + ulp) fall into the outermost cells, which hold
// no threshold. Per cell c (table slot c & 31, as permutex2var reads 5 index bits):
//   code = x > pivot[c] ? code_greater[c] : code_not_greater[c]
// NF4: code_not_greater = number of thresholds below the cell, the pivot is the threshold in the cell
// (+inf if none), code_greater = one more. FP4 counts thresholds t with |x| > t: for x >= 0 the same, mapped
// through kFP4BucketToCode; for x < 0 (only the cells c < 0 hold negative x; -0 lands in cell 0, as
// fp4_code gives -0 no sign) |x| > t <=> x < -t <=> !(x > nextafter(-t, -inf)), so that pivot is used and the
// two codes swap, each with the sign bit.
struct CodeSearch {
  __m512 pivots_low, pivots_high;                 // slots 0..15 (cells 0..15) and 16..31 (cells -16..-1)
  __m512i codes_low, codes_high;                  // code when !(x > pivot)
  __m512i codes_greater_low, codes_greater_high;  // code when x > pivot
};

template <QuantType kQuant>
static inline CodeSearch make_code_search() {
  alignas(64) float pivots[32];
  alignas(64) int32_t codes[32], codes_greater[32];
  for (int slot = 0; slot < 32; ++slot) {
    const int cell = slot < 16 ? slot : slot - 32;
    const float low = static_cast<float>(cell) / 16.0f, high = static_cast<float>(cell + 1) / 16.0f;
    if constexpr (kQuant == QuantType::kNF4) {
      int below = 0;
      float pivot = std::numeric_limits<float>::infinity();
      for (const float t : kNF4Thresholds) {
        below += t < low ? 1 : 0;
        if (low <= t && t < high) pivot = t;
      }
      pivots[slot] = pivot;
      codes[slot] = below;
      codes_greater[slot] = below + 1;
    } else if (cell >= 0) {
      int below = 0;
      float pivot = std::numeric_limits<float>::infinity();
      for (const float t : kFP4Thresholds) {
        below += t < low ? 1 : 0;
        if (low <= t && t < high) pivot = t;
      }
      pivots[slot] = pivot;
      codes[slot] = kFP4BucketToCode[below];
      codes_greater[slot] = kFP4BucketToCode[std::min(below + 1, 7)];
    } else {
      // |x| in (-high, -low]: thresholds t <= -high are always exceeded, one in (-high, -low] maybe
      int exceeded = 0;
      float pivot = -std::numeric_limits<float>::infinity();
      for (const float t : kFP4Thresholds) {
        exceeded += t <= -high ? 1 : 0;
        if (-high < t && t <= -low) pivot = std::nextafter(-t, -std::numeric_limits<float>::infinity());
      }
      pivots[slot] = pivot;
      codes_greater[slot] = kFP4BucketToCode[exceeded] | 0b1000;
      codes[slot] = kFP4BucketToCode[std::min(exceeded + 1, 7)] | 0b1000;
    }
  }
  return {_mm512_load_ps(pivots),        _mm512_load_ps(pivots + 16),      _mm512_load_si512(codes),
          _mm512_load_si512(codes + 16), _mm512_load_si512(codes_greater), _mm512_load_si512(codes_greater + 16)};
}

// 16 codes (one per 32-bit lane) of values already scaled by 1/absmax.
template <QuantType kQuant>
static inline __m512i codes_16(__m512 x, const CodeSearch& search) {
  // imm 0b0010: the smaller magnitude of (16 x, 255/16), with the sign of 16 x (the first operand)
  const __m512 clamped = _mm512_range_ps(_mm512_mul_ps(x, _mm512_set1_ps(16.0f)), _mm512_set1_ps(15.9375f), 0x02);
  const __m512i cell = _mm512_cvt_roundps_epi32(clamped, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const __mmask16 greater =
      _mm512_cmp_ps_mask(x, _mm512_permutex2var_ps(search.pivots_low, cell, search.pivots_high), _CMP_GT_OQ);
  const __m512i code = _mm512_permutex2var_epi32(search.codes_low, cell, search.codes_high);
  if constexpr (kQuant == QuantType::kNF4) {
    return _mm512_mask_add_epi32(code, greater, code, _mm512_set1_epi32(1));
  } else {
    return _mm512_mask_blend_epi32(
        greater, code, _mm512_permutex2var_epi32(search.codes_greater_low, cell, search.codes_greater_high));
  }
}

// 64 codes (4 x 16 lanes, in element order) -> 32 bytes.
static inline __m256i pack_64_codes(__m512i c0, __m512i c1, __m512i c2, __m512i c3) {
  // In-lane packs: 128-bit lane k ends up holding the codes of elements 4k..4k+3 of c0, c1, c2, c3 (bytes).
  const __m512i bytes = _mm512_packus_epi16(_mm512_packus_epi32(c0, c1), _mm512_packus_epi32(c2, c3));
  // (even, odd) byte pairs -> 16 * even + odd: the packed byte, in a 16-bit lane
  const __m512i pairs = _mm512_maddubs_epi16(bytes, _mm512_set1_epi16(0x0110));
  // 32-bit lane (k, c) holds the two bytes of elements 4k..4k+3 of vector c; put them in element order
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_cvtepi16_epi8(_mm512_permutexvar_epi32(order, pairs));
}

// 16 codes -> 8 bytes (in the low half).
static inline __m128i pack_16_codes(__m512i codes) {
  // 64-bit lane j holds codes 2j (low half) and 2j+1 (high half): byte = code[2j] << 4 | code[2j+1]
  return _mm512_cvtepi64_epi8(_mm512_or_si512(_mm512_slli_epi32(codes, 4), _mm512_srli_epi64(codes, 32)));
}

// Codes of one finite block in[start, end) (start even) with its scale. kPrescale false: prescale is 1, and
// x * 1 == x exactly for every finite x (subnormals too: FTZ/DAZ runs the generic loop), so that product
// is skipped.
template <FloatType kIn, QuantType kQuant, bool kPrescale>
static inline void quantize_4bit_block_codes_scaled(const void* in, int64_t start, int64_t end, float prescale_value,
                                                    float inv_absmax_value, const CodeSearch& search, uint8_t* packed) {
  const __m512 prescale = _mm512_set1_ps(prescale_value);
  const __m512 inv_absmax = _mm512_set1_ps(inv_absmax_value);
  auto scaled = [&](__m512 x) { return _mm512_mul_ps(kPrescale ? _mm512_mul_ps(x, prescale) : x, inv_absmax); };
  int64_t i = start;
  if constexpr (kIn == FloatType::kBFloat16) {
    // 32-bit lane j of a 64-byte load holds elements 2j (low half) and 2j+1 (high half): shifting or
    // masking gives the even and the odd elements as fp32, whose codes are the byte's two nibbles.
    const __m512i high_half = _mm512_set1_epi32(static_cast<int32_t>(0xffff0000u));
    const uint16_t* src = static_cast<const uint16_t*>(in);
    for (; i + 32 <= end; i += 32) {
      const __m512i pairs = _mm512_loadu_si512(src + i);
      const __m512 even = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
      const __m512 odd = _mm512_castsi512_ps(_mm512_and_si512(pairs, high_half));
      const __m512i bytes = _mm512_or_si512(_mm512_slli_epi32(codes_16<kQuant>(scaled(even), search), 4),
                                            codes_16<kQuant>(scaled(odd), search));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(packed + i / 2), _mm512_cvtepi32_epi8(bytes));
    }
  }
  for (; i + 64 <= end; i += 64) {
    const __m512i c0 = codes_16<kQuant>(scaled(load_16_as_float<kIn>(in, i)), search);
    const __m512i c1 = codes_16<kQuant>(scaled(load_16_as_float<kIn>(in, i + 16)), search);
    const __m512i c2 = codes_16<kQuant>(scaled(load_16_as_float<kIn>(in, i + 32)), search);
    const __m512i c3 = codes_16<kQuant>(scaled(load_16_as_float<kIn>(in, i + 48)), search);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(packed + i / 2), pack_64_codes(c0, c1, c2, c3));
  }
  for (; i < end; i += 16) {
    const int64_t count = std::min<int64_t>(16, end - i);
    const __m512 x = load_16_as_float_masked<kIn>(in, i, first_lanes_16(count));
    _mm_mask_storeu_epi8(packed + i / 2, first_lanes_16((count + 1) / 2),
                         pack_16_codes(codes_16<kQuant>(scaled(x), search)));
  }
}

template <FloatType kIn, QuantType kQuant>
static inline void quantize_4bit_block_codes(const void* in, int64_t start, int64_t end, float prescale_value,
                                             float inv_absmax_value, const CodeSearch& search, uint8_t* packed) {
  if (prescale_value == 1.0f) {
    quantize_4bit_block_codes_scaled<kIn, kQuant, false>(in, start, end, 1.0f, inv_absmax_value, search, packed);
  } else {
    quantize_4bit_block_codes_scaled<kIn, kQuant, true>(in, start, end, prescale_value, inv_absmax_value, search,
                                                        packed);
  }
}

// Lane-wise max of |x| bit patterns over one full block (32 16-bit or 16 32-bit lanes); the block is a
// multiple of 64 bytes (blocksize >= 32).
template <FloatType kIn>
static inline __m512i block_max_lanes(const void* in, int64_t start, int64_t blocksize) {
  const char* bytes = static_cast<const char*>(in) + start * static_cast<int64_t>(kIn == FloatType::kFloat32 ? 4 : 2);
  const int64_t vectors = blocksize * (kIn == FloatType::kFloat32 ? 4 : 2) / 64;
  const __m512i magnitude = kIn == FloatType::kFloat32 ? _mm512_set1_epi32(0x7fffffff) : _mm512_set1_epi16(0x7fff);
  __m512i max = _mm512_setzero_si512();
  for (int64_t v = 0; v < vectors; ++v) {
    const __m512i x = _mm512_and_si512(_mm512_loadu_si512(bytes + 64 * v), magnitude);
    max = kIn == FloatType::kFloat32 ? _mm512_max_epu32(max, x) : _mm512_max_epu16(max, x);
  }
  return max;
}

// 16 blocks' lane-wise maxima -> one vector of their absmax bit patterns (as fp32), in block order; above
// 0x7f7fffff for a block with a NaN or an Inf. A transposing tree: each level halves the width of a
// block's segment and merges two vectors into one.
template <FloatType kIn>
static inline __m512i reduce_16_blocks(__m512i lanes[16]) {
  auto max = [](__m512i a, __m512i b) {
    return kIn == FloatType::kFloat32 ? _mm512_max_epu32(a, b) : _mm512_max_epu16(a, b);
  };
  // 512 -> 256 bits per block: vector k = [block 2k | block 2k+1]
  for (int k = 0; k < 8; ++k) {
    lanes[k] = max(_mm512_shuffle_i64x2(lanes[2 * k], lanes[2 * k + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                   _mm512_shuffle_i64x2(lanes[2 * k], lanes[2 * k + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  }
  // 256 -> 128: vector k = blocks 4k..4k+3, one per 128-bit lane
  for (int k = 0; k < 4; ++k) {
    lanes[k] = max(_mm512_shuffle_i64x2(lanes[2 * k], lanes[2 * k + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                   _mm512_shuffle_i64x2(lanes[2 * k], lanes[2 * k + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  }
  // 128 -> 64: 128-bit lane l of vector k = [block 8k + l, block 8k + 4 + l]
  for (int k = 0; k < 2; ++k) {
    lanes[k] = max(_mm512_unpacklo_epi64(lanes[2 * k], lanes[2 * k + 1]),
                   _mm512_unpackhi_epi64(lanes[2 * k], lanes[2 * k + 1]));
  }
  // 64 -> 32: 32-bit lane 4l + m = block l + 4m
  const __m512 first = _mm512_castsi512_ps(lanes[0]), second = _mm512_castsi512_ps(lanes[1]);
  __m512i bits = max(_mm512_castps_si512(_mm512_shuffle_ps(first, second, _MM_SHUFFLE(2, 0, 2, 0))),
                     _mm512_castps_si512(_mm512_shuffle_ps(first, second, _MM_SHUFFLE(3, 1, 3, 1))));
  bits = _mm512_permutexvar_epi32(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), bits);
  if constexpr (kIn == FloatType::kFloat32) return bits;
  // 32 -> 16: the larger 16-bit half, then converted to fp32 bits (exact)
  const __m512i half = _mm512_max_epu16(bits, _mm512_srli_epi32(bits, 16));
  if constexpr (kIn == FloatType::kBFloat16) return _mm512_slli_epi32(half, 16);
  const __m512i widened = _mm512_castps_si512(_mm512_cvtph_ps(_mm512_cvtepi32_epi16(half)));
  return _mm512_mask_mov_epi32(
      widened, _mm512_cmpgt_epu32_mask(_mm512_and_si512(half, _mm512_set1_epi32(0xffff)), _mm512_set1_epi32(0x7bff)),
      _mm512_set1_epi32(-1));
}

template <FloatType kIn, QuantType kQuant>
static void quantize_4bit_blocks_simd(const void* in, int64_t n, int64_t blocksize, uint8_t* packed, float* absmax,
                                      int64_t block_begin, int64_t block_end) {
  const CodeSearch search = make_code_search<kQuant>();
  int64_t block = block_begin;
  // Small blocks, 16 at a time: absmax, the non-finite test and block_scale as vector operations.
  constexpr int64_t kGroup = 16;
  if (blocksize <= 256) {
    for (; block + kGroup <= block_end && (block + kGroup) * blocksize <= n; block += kGroup) {
      __m512i lanes[kGroup];
      prefetch_ahead<kIn>(in, block * blocksize, kGroup * blocksize);
      for (int b = 0; b < kGroup; ++b) lanes[b] = block_max_lanes<kIn>(in, (block + b) * blocksize, blocksize);
      const __m512i bits = reduce_16_blocks<kIn>(lanes);
      const __m512 block_max = _mm512_castsi512_ps(bits);
      const __mmask16 nonfinite = _mm512_cmpgt_epu32_mask(bits, _mm512_set1_epi32(0x7f7fffff));
      _mm512_storeu_ps(absmax + block, _mm512_mask_mov_ps(block_max, nonfinite,
                                                          _mm512_set1_ps(std::numeric_limits<float>::quiet_NaN())));
      // block_scale, lane-wise: the same operations on the same values
      const __mmask16 zero = _mm512_cmpeq_epu32_mask(bits, _mm512_setzero_si512());
      const __mmask16 subnormal = _mm512_cmplt_epu32_mask(bits, _mm512_set1_epi32(0x00800000)) & ~zero;
      const __m512 prescale =
          _mm512_mask_mov_ps(_mm512_set1_ps(1.0f), subnormal, _mm512_set1_ps(18446744073709551616.0f));
      const __m512 inv_absmax =
          _mm512_maskz_div_ps(static_cast<__mmask16>(~zero), _mm512_set1_ps(1.0f), _mm512_mul_ps(block_max, prescale));
      alignas(64) float prescales[kGroup], inv_absmaxes[kGroup];
      _mm512_store_ps(prescales, prescale);
      _mm512_store_ps(inv_absmaxes, inv_absmax);
      for (int b = 0; b < kGroup; ++b) {
        const int64_t start = (block + b) * blocksize;
        if ((nonfinite >> b) & 1) {
          const uint8_t zero_byte = zero_code(kQuant);
          std::memset(packed + start / 2, zero_byte << 4 | zero_byte, static_cast<size_t>(blocksize / 2));
          continue;
        }
        quantize_4bit_block_codes<kIn, kQuant>(in, start, start + blocksize, prescales[b], inv_absmaxes[b], search,
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
    const BlockScale scale = block_scale(block_max);
    quantize_4bit_block_codes<kIn, kQuant>(in, start, end, scale.prescale, scale.inv_absmax, search, packed);
  }
}

// kStream: full 64-byte chunks go out with non-temporal stores (the caller checked the alignment).
template <FloatType kOut, bool kStream>
static void dequantize_4bit_blocks_simd(const uint8_t* packed, const float* absmax, int64_t n, int64_t blocksize,
                                        QuantType quant_type, void* out, int64_t block_begin, int64_t block_end) {
  alignas(64) float table[16];
  fill_code_table(quant_type, table);
  const __m512 codes = _mm512_load_ps(table);
  for (int64_t block = block_begin; block < block_end; ++block) {
    const int64_t start = block * blocksize;
    const int64_t end = std::min(n, start + blocksize);
    const __m512 values = _mm512_mul_ps(codes, _mm512_set1_ps(absmax[block]));
    int64_t i = start;
    if constexpr (kOut == FloatType::kFloat32) {
      float* dst = static_cast<float*>(out);
      const __m512i interleave_low = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
      const __m512i interleave_high = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
      for (; i + 32 <= end; i += 32) {
        // permutexvar uses the low 4 bits of each index: byte >> 4 is the even element, byte the odd one
        const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + i / 2)));
        const __m512 even = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), values);
        const __m512 odd = _mm512_permutexvar_ps(bytes, values);
        const __m512 first = _mm512_permutex2var_ps(even, interleave_low, odd);
        const __m512 second = _mm512_permutex2var_ps(even, interleave_high, odd);
        if constexpr (kStream) {
          _mm512_stream_ps(dst + i, first);
          _mm512_stream_ps(dst + i + 16, second);
        } else {
          _mm512_storeu_ps(dst + i, first);
          _mm512_storeu_ps(dst + i + 16, second);
        }
      }
      for (; i < end; i += 16) {
        const int64_t count = std::min<int64_t>(16, end - i);
        // 64-bit lane j: index of element 2j (byte >> 4) low, of element 2j+1 (byte, low 4 bits used) high
        const __m512i bytes =
            _mm512_cvtepu8_epi64(_mm_maskz_loadu_epi8(first_lanes_16((count + 1) / 2), packed + i / 2));
        const __m512i index = _mm512_or_si512(_mm512_srli_epi64(bytes, 4), _mm512_slli_epi64(bytes, 32));
        _mm512_mask_storeu_ps(dst + i, first_lanes_16(count), _mm512_permutexvar_ps(index, values));
      }
    } else {
      uint16_t* dst = static_cast<uint16_t*>(out);
      const __m256i rounded =
          kOut == FloatType::kFloat16 ? fp16_bits_16(values) : _mm512_cvtepi32_epi16(bf16_bits_16(values));
      // 32 entries, the 16 rounded products twice: vpermw reads 5 index bits
      const __m512i lookup = _mm512_inserti64x4(_mm512_castsi256_si512(rounded), rounded, 1);
      for (; i < end; i += 32) {
        const int64_t count = std::min<int64_t>(32, end - i);
        // 32-bit lane j: index of element 2j (byte >> 4) in the low 16 bits, of element 2j+1 (the byte,
        // whose bit 4 picks the second copy of the table) in the high 16 bits
        const __m128i packed_bytes = count == 32
                                         ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + i / 2))
                                         : _mm_maskz_loadu_epi8(first_lanes_16((count + 1) / 2), packed + i / 2);
        const __m512i bytes = _mm512_cvtepu8_epi32(packed_bytes);
        const __m512i index = _mm512_or_si512(_mm512_srli_epi32(bytes, 4), _mm512_slli_epi32(bytes, 16));
        const __m512i result = _mm512_permutexvar_epi16(index, lookup);
        if (count == 32 && kStream) {
          _mm512_stream_si512(reinterpret_cast<__m512i*>(dst + i), result);
        } else if (count == 32) {
          _mm512_storeu_si512(dst + i, result);
        } else {
          _mm512_mask_storeu_epi16(dst + i, static_cast<__mmask32>((1ull << count) - 1), result);
        }
      }
    }
  }
}
