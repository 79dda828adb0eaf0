// 4-bit blockwise quantize / dequantize, compiled once per instruction set (see kernels.h).
// The portable loops below are the C++ twin of tests/reference.py::quantize_4bit_ref; the SIMD paths must
// give the same bytes and absmax, and the tests check every instruction set against the reference.
#pragma once

#include <cfloat>
#include <cmath>
#include <limits>

// The block scale (BlockScale, block_scale) is common/rules.h's, shared with the CUDA kernels.

static inline uint8_t code_4bit(QuantType quant_type, float scaled) {
  return quant_type == QuantType::kNF4 ? nf4_code(scaled) : fp4_code(scaled);
}

// Largest |x| of a block; sets *nonfinite when the block holds a NaN or an Inf.
template <FloatType kIn>
static inline float block_absmax(const void* in, int64_t start, int64_t end, bool* nonfinite) {
  float absmax = 0.0f;
  bool bad = false;
  for (int64_t i = start; i < end; ++i) {
    const float magnitude = std::fabs(load_as_float<kIn>(in, i));
    bad |= !(magnitude <= FLT_MAX);
    absmax = magnitude > absmax ? magnitude : absmax;
  }
  *nonfinite = bad;
  return absmax;
}

// Codes of in[begin, end) into packed[begin / 2, ...); begin is even. A missing last element (odd end)
// packs as the zero code. Shared by the generic loop and the SIMD paths' tails.
template <FloatType kIn>
static inline void quantize_4bit_range(const void* in, int64_t begin, int64_t end, BlockScale scale,
                                       QuantType quant_type, uint8_t* packed) {
  for (int64_t i = begin; i < end; i += 2) {
    const uint8_t high = code_4bit(quant_type, load_as_float<kIn>(in, i) * scale.prescale * scale.inv_absmax);
    const uint8_t low = i + 1 < end
                            ? code_4bit(quant_type, load_as_float<kIn>(in, i + 1) * scale.prescale * scale.inv_absmax)
                            : zero_code(quant_type);
    packed[i / 2] = static_cast<uint8_t>(high << 4 | low);
  }
}

// NaN/Inf contract: a block holding a NaN or an Inf gets a NaN absmax (so every element of it dequantizes
// to NaN) and zero codes.
static inline void store_nonfinite_block(int64_t block, int64_t start, int64_t end, QuantType quant_type,
                                         uint8_t* packed, float* absmax) {
  absmax[block] = std::numeric_limits<float>::quiet_NaN();
  const uint8_t zero = zero_code(quant_type);
  std::memset(packed + start / 2, zero << 4 | zero, static_cast<size_t>((end - start + 1) / 2));
}

template <FloatType kIn>
static void quantize_4bit_generic(const void* in, int64_t n, int64_t blocksize, QuantType quant_type,
                                  uint8_t* packed, float* absmax, int64_t block_begin, int64_t block_end) {
  for (int64_t block = block_begin; block < block_end; ++block) {
    const int64_t start = block * blocksize;
    const int64_t end = std::min(n, start + blocksize);
    bool nonfinite = false;
    const float block_max = block_absmax<kIn>(in, start, end, &nonfinite);
    if (nonfinite) {
      store_nonfinite_block(block, start, end, quant_type, packed, absmax);
      continue;
    }
    absmax[block] = block_max;
    quantize_4bit_range<kIn>(in, start, end, block_scale(block_max), quant_type, packed);
  }
}

// out[begin, end) = table[code] * block_max, rounded once to kOut; begin is even.
template <FloatType kOut>
static inline void dequantize_4bit_range(const uint8_t* packed, const float table[16], float block_max,
                                         int64_t begin, int64_t end, void* out) {
  for (int64_t i = begin; i < end; ++i) {
    const uint8_t byte = packed[i / 2];
    const uint8_t code = (i & 1) ? (byte & 0x0f) : (byte >> 4);
    store_from_float<kOut>(out, i, table[code] * block_max);
  }
}

template <FloatType kOut>
static void dequantize_4bit_generic(const uint8_t* packed, const float* absmax, int64_t n, int64_t blocksize,
                                    QuantType quant_type, void* out, int64_t block_begin, int64_t block_end) {
  float table[16];
  fill_code_table(quant_type, table);
  for (int64_t block = block_begin; block < block_end; ++block) {
    const int64_t start = block * blocksize;
    const int64_t end = std::min(n, start + blocksize);
    dequantize_4bit_range<kOut>(packed, table, absmax[block], start, end, out);
  }
}

#if defined(__AVX512F__) || defined(__AVX2__)
// ---- SIMD paths ------------------------------------------------------------------------------------------
// They give the generic loops' results bit for bit:
// - absmax: for non-negative floats the integer order of the bit patterns is the float order, and every
//   NaN/Inf pattern is above FLT_MAX's, so one integer max over |x| bits gives both the absmax and the
//   non-finite test (max > FLT_MAX bits).
// - scaling: the same two fp32 products, x * prescale * inv_absmax (no FMA: -ffp-contract=off).
// - codes: "number of thresholds t with x > t". AVX-512 looks it up by cell of width 1/16 (CodeSearch
//   below), AVX2 runs a branch-free binary search over the sorted thresholds, each level picking its pivot
//   from a small table indexed by the code prefix found so far.
// - dequantize: the 16 products table[q] * absmax are computed (and, for 16-bit outputs, rounded) once per
//   block; rounding is a function of the fp32 value, so looking up rounded products equals rounding each one.
// - packing: element 2j in the high nibble of byte j, as quantize_4bit_range does.
// These shortcuts assume IEEE subnormals. With flush-to-zero or denormals-are-zero set in this thread's
// MXCSR (torch.set_flush_denormal(True)) the generic loops' float compares and products see subnormals as
// zero while integer shortcuts do not, so every SIMD entry point then runs the generic loop instead.
static inline bool denormals_flushed() { return (_mm_getcsr() & 0x8040u) != 0; }  // FTZ (bit 15) | DAZ (bit 6)

// fp32 -> bf16 round-to-nearest-even as float_to_bf16 does it: NaN -> 0x7fc0, everything else by integer
// rounding of the bit pattern. Lanes hold the 16-bit results zero-extended.
#if defined(__AVX512F__)
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
  const __m512i nan_bits = _mm512_or_si512(
      _mm512_and_si512(_mm512_srli_epi32(_mm512_castps_si512(value), 16), _mm512_set1_epi32(0x8000)),
      _mm512_set1_epi32(0x7e00));
  return _mm256_mask_mov_epi16(half, _mm512_cmp_ps_mask(value, value, _CMP_UNORD_Q),
                               _mm512_cvtepi32_epi16(nan_bits));
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
    const uint16_t bits = static_cast<uint16_t>(~_mm_cvtsi128_si32(_mm_minpos_epu16(_mm_xor_si128(max128, _mm_set1_epi32(-1)))));
    if constexpr (kIn == FloatType::kBFloat16) return static_cast<uint32_t>(bits) << 16;
    return bits > 0x7bffu ? 0xffffffffu : float_to_bits(fp16_to_float(bits));
  }
}

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
  __m512 pivots_low, pivots_high;  // slots 0..15 (cells 0..15) and 16..31 (cells -16..-1)
  __m512i codes_low, codes_high;   // code when !(x > pivot)
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
  return {_mm512_load_ps(pivots), _mm512_load_ps(pivots + 16), _mm512_load_si512(codes),
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
    return _mm512_mask_blend_epi32(greater, code,
                                   _mm512_permutex2var_epi32(search.codes_greater_low, cell, search.codes_greater_high));
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
  auto scaled = [&](__m512 x) {
    return _mm512_mul_ps(kPrescale ? _mm512_mul_ps(x, prescale) : x, inv_absmax);
  };
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
    _mm_mask_storeu_epi8(packed + i / 2, first_lanes_16((count + 1) / 2), pack_16_codes(codes_16<kQuant>(scaled(x), search)));
  }
}

template <FloatType kIn, QuantType kQuant>
static inline void quantize_4bit_block_codes(const void* in, int64_t start, int64_t end, float prescale_value,
                                             float inv_absmax_value, const CodeSearch& search, uint8_t* packed) {
  if (prescale_value == 1.0f) {
    quantize_4bit_block_codes_scaled<kIn, kQuant, false>(in, start, end, 1.0f, inv_absmax_value, search, packed);
  } else {
    quantize_4bit_block_codes_scaled<kIn, kQuant, true>(in, start, end, prescale_value, inv_absmax_value, search, packed);
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
  auto max = [](__m512i a, __m512i b) { return kIn == FloatType::kFloat32 ? _mm512_max_epu32(a, b) : _mm512_max_epu16(a, b); };
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
    lanes[k] = max(_mm512_unpacklo_epi64(lanes[2 * k], lanes[2 * k + 1]), _mm512_unpackhi_epi64(lanes[2 * k], lanes[2 * k + 1]));
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
  return _mm512_mask_mov_epi32(widened, _mm512_cmpgt_epu32_mask(_mm512_and_si512(half, _mm512_set1_epi32(0xffff)),
                                                                  _mm512_set1_epi32(0x7bff)),
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
      for (int b = 0; b < kGroup; ++b) lanes[b] = block_max_lanes<kIn>(in, (block + b) * blocksize, blocksize);
      const __m512i bits = reduce_16_blocks<kIn>(lanes);
      const __m512 block_max = _mm512_castsi512_ps(bits);
      const __mmask16 nonfinite = _mm512_cmpgt_epu32_mask(bits, _mm512_set1_epi32(0x7f7fffff));
      _mm512_storeu_ps(absmax + block,
                       _mm512_mask_mov_ps(block_max, nonfinite, _mm512_set1_ps(std::numeric_limits<float>::quiet_NaN())));
      // block_scale, lane-wise: the same operations on the same values
      const __mmask16 zero = _mm512_cmpeq_epu32_mask(bits, _mm512_setzero_si512());
      const __mmask16 subnormal = _mm512_cmplt_epu32_mask(bits, _mm512_set1_epi32(0x00800000)) & ~zero;
      const __m512 prescale = _mm512_mask_mov_ps(_mm512_set1_ps(1.0f), subnormal, _mm512_set1_ps(18446744073709551616.0f));
      const __m512 inv_absmax = _mm512_maskz_div_ps(static_cast<__mmask16>(~zero), _mm512_set1_ps(1.0f), _mm512_mul_ps(block_max, prescale));
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
        quantize_4bit_block_codes<kIn, kQuant>(in, start, start + blocksize, prescales[b], inv_absmaxes[b], search, packed);
      }
    }
  }
  for (; block < block_end; ++block) {
    const int64_t start = block * blocksize;
    const int64_t end = std::min(n, start + blocksize);
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
        const __m512i bytes = _mm512_cvtepu8_epi64(_mm_maskz_loadu_epi8(first_lanes_16((count + 1) / 2), packed + i / 2));
        const __m512i index = _mm512_or_si512(_mm512_srli_epi64(bytes, 4), _mm512_slli_epi64(bytes, 32));
        _mm512_mask_storeu_ps(dst + i, first_lanes_16(count), _mm512_permutexvar_ps(index, values));
      }
    } else {
      uint16_t* dst = static_cast<uint16_t*>(out);
      const __m256i rounded = kOut == FloatType::kFloat16 ? fp16_bits_16(values) : _mm512_cvtepi32_epi16(bf16_bits_16(values));
      // 32 entries, the 16 rounded products twice: vpermw reads 5 index bits
      const __m512i lookup = _mm512_inserti64x4(_mm512_castsi256_si512(rounded), rounded, 1);
      for (; i < end; i += 32) {
        const int64_t count = std::min<int64_t>(32, end - i);
        // 32-bit lane j: index of element 2j (byte >> 4) in the low 16 bits, of element 2j+1 (the byte,
        // whose bit 4 picks the second copy of the table) in the high 16 bits
        const __m128i packed_bytes =
            count == 32 ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + i / 2))
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

#elif defined(__AVX2__)

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
  const __m256i nan_bits = _mm256_or_si256(
      _mm256_and_si256(_mm256_srli_epi32(_mm256_castps_si256(value), 16), _mm256_set1_epi32(0x8000)),
      _mm256_set1_epi32(0x7e00));
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(value, value, _CMP_UNORD_Q));
  // 32-bit lanes -> 16-bit lanes, in order (values fit: no saturation)
  const __m128i nan_bits16 = _mm_packus_epi32(_mm256_castsi256_si128(nan_bits), _mm256_extracti128_si256(nan_bits, 1));
  const __m128i nan16 = _mm_packs_epi32(_mm256_castsi256_si128(nan), _mm256_extracti128_si256(nan, 1));
  return _mm_blendv_epi8(half, nan_bits16, nan16);
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
      max0 = _mm256_max_epu32(max0, _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i)), magnitude));
      max1 = _mm256_max_epu32(max1, _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i + 8)), magnitude));
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
      max0 = _mm256_max_epu16(max0, _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i)), magnitude));
      max1 = _mm256_max_epu16(max1, _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i + 16)), magnitude));
    }
    const __m256i max256 = _mm256_max_epu16(max0, max1);
    const __m128i max128 = _mm_max_epu16(_mm256_castsi256_si128(max256), _mm256_extracti128_si256(max256, 1));
    // the largest of 8 = the complement of the smallest complement (phminposuw)
    uint16_t bits = static_cast<uint16_t>(~_mm_cvtsi128_si32(_mm_minpos_epu16(_mm_xor_si128(max128, _mm_set1_epi32(-1)))));
    for (; i < end; ++i) bits = std::max<uint16_t>(bits, src[i] & 0x7fffu);
    if constexpr (kIn == FloatType::kBFloat16) return static_cast<uint32_t>(bits) << 16;
    return bits > 0x7bffu ? 0xffffffffu : float_to_bits(fp16_to_float(bits));
  }
}

// Pivot tables of the binary searches, indexed by the code prefix so far (p = code >> step_bits).
// NF4: 15 thresholds, steps 8, 4, 2, 1; FP4: 7 magnitude thresholds, steps 4, 2, 1, then the sign.
struct CodeSearch {
  __m256 pivot;         // first level, every lane
  __m256 pivots_level2; // [p] = threshold 2p * step + step - 1 at the second level, and so on
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
    return {_mm256_set1_ps(kNF4Thresholds[7]), _mm256_load_ps(level2), _mm256_load_ps(level3),
            _mm256_load_ps(level4), _mm256_load_si256(reinterpret_cast<const __m256i*>(fp4_codes))};
  } else {
    for (int p = 0; p < 2; ++p) level2[p] = kFP4Thresholds[4 * p + 1];
    for (int p = 0; p < 4; ++p) level3[p] = kFP4Thresholds[2 * p];
    return {_mm256_set1_ps(kFP4Thresholds[3]), _mm256_load_ps(level2), _mm256_load_ps(level3),
            _mm256_setzero_ps(), _mm256_load_si256(reinterpret_cast<const __m256i*>(fp4_codes))};
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
    const __m256 magnitude = _mm256_castsi256_ps(_mm256_and_si256(_mm256_castps_si256(x), _mm256_set1_epi32(0x7fffffff)));
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
  auto scaled = [&](__m256 x) {
    return _mm256_mul_ps(kPrescale ? _mm256_mul_ps(x, prescale) : x, inv_absmax);
  };
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
  auto max = [](__m256i a, __m256i b) { return kIn == FloatType::kFloat32 ? _mm256_max_epu32(a, b) : _mm256_max_epu16(a, b); };
  // 256 -> 128 bits per block: vector k = [block 2k | block 2k+1]
  for (int k = 0; k < 4; ++k) {
    lanes[k] = max(_mm256_permute2x128_si256(lanes[2 * k], lanes[2 * k + 1], 0x20),
                   _mm256_permute2x128_si256(lanes[2 * k], lanes[2 * k + 1], 0x31));
  }
  // 128 -> 64: 128-bit lane l of vector k = [block 4k + l, block 4k + 2 + l]
  for (int k = 0; k < 2; ++k) {
    lanes[k] = max(_mm256_unpacklo_epi64(lanes[2 * k], lanes[2 * k + 1]), _mm256_unpackhi_epi64(lanes[2 * k], lanes[2 * k + 1]));
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
  return _mm256_blendv_epi8(widened, _mm256_set1_epi32(0x7fffffff), _mm256_cmpgt_epi32(half, _mm256_set1_epi32(0x7bff)));
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
      for (int b = 0; b < kGroup; ++b) lanes[b] = block_max_lanes<kIn>(in, (block + b) * blocksize, blocksize);
      const __m256i bits = reduce_8_blocks<kIn>(lanes);  // <= 0x7fffffff: signed compares are safe
      const __m256 block_max = _mm256_castsi256_ps(bits);
      const __m256i nonfinite = _mm256_cmpgt_epi32(bits, _mm256_set1_epi32(0x7f7fffff));
      _mm256_storeu_ps(absmax + block, _mm256_blendv_ps(block_max, _mm256_set1_ps(std::numeric_limits<float>::quiet_NaN()),
                                                        _mm256_castsi256_ps(nonfinite)));
      // block_scale, lane-wise: the same operations on the same values (a zero block divides 1 by 1, unused)
      const __m256 zero = _mm256_castsi256_ps(_mm256_cmpeq_epi32(bits, _mm256_setzero_si256()));
      const __m256 subnormal = _mm256_andnot_ps(zero, _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(0x00800000), bits)));
      const __m256 one = _mm256_set1_ps(1.0f);
      const __m256 prescale = _mm256_blendv_ps(one, _mm256_set1_ps(18446744073709551616.0f), subnormal);
      const __m256 inv_absmax = _mm256_andnot_ps(zero, _mm256_div_ps(one, _mm256_blendv_ps(_mm256_mul_ps(block_max, prescale), one, zero)));
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
        quantize_4bit_block_codes<kIn, kQuant>(in, start, start + blocksize, {prescales[b], inv_absmaxes[b]}, search, packed);
      }
    }
  }
  for (; block < block_end; ++block) {
    const int64_t start = block * blocksize;
    const int64_t end = std::min(n, start + blocksize);
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
        const __m128i index = _mm_unpacklo_epi8(_mm_and_si128(_mm_srli_epi16(bytes, 4), nibble), _mm_and_si128(bytes, nibble));
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
        rounded = _mm256_permute4x64_epi64(_mm256_packus_epi32(bf16_bits_8(values_low), bf16_bits_8(values_high)), 0xd8);
      }
      // pshufb tables: the low bytes and the high bytes of the 16 results, in both 128-bit lanes
      const __m256i split = _mm256_shuffle_epi8(
          rounded, _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15, 0, 2, 4, 6, 8, 10, 12, 14, 1, 3,
                                    5, 7, 9, 11, 13, 15));
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

#endif

// Outputs at least this large bypass the caches (non-temporal stores): they could not stay there anyway,
// and skipping the read-for-ownership of every output line saves about a third of the memory traffic
// (measured: 4096x11008 bf16, 1.3x faster on one core). Smaller outputs stay cached for their consumer.
constexpr int64_t kStreamOutputBytes = int64_t{16} << 20;

template <FloatType kOut>
static void dequantize_4bit_simd(const uint8_t* packed, const float* absmax, int64_t n, int64_t blocksize,
                                 QuantType quant_type, void* out, int64_t block_begin, int64_t block_end) {
  if (denormals_flushed()) {
    return dequantize_4bit_generic<kOut>(packed, absmax, n, blocksize, quant_type, out, block_begin, block_end);
  }
  const int64_t out_bytes = n * (kOut == FloatType::kFloat32 ? 4 : 2);
  // every block starts 64-byte aligned when the output does (blocksize >= 32 elements of >= 2 bytes)
  if (out_bytes >= kStreamOutputBytes && reinterpret_cast<uintptr_t>(out) % 64 == 0) {
    dequantize_4bit_blocks_simd<kOut, true>(packed, absmax, n, blocksize, quant_type, out, block_begin, block_end);
    _mm_sfence();  // order the weakly-ordered streaming stores before the caller reads the output
  } else {
    dequantize_4bit_blocks_simd<kOut, false>(packed, absmax, n, blocksize, quant_type, out, block_begin, block_end);
  }
}

template <FloatType kIn>
static void quantize_4bit_simd(const void* in, int64_t n, int64_t blocksize, QuantType quant_type, uint8_t* packed,
                               float* absmax, int64_t block_begin, int64_t block_end) {
  if (denormals_flushed()) {
    return quantize_4bit_generic<kIn>(in, n, blocksize, quant_type, packed, absmax, block_begin, block_end);
  }
  if (quant_type == QuantType::kNF4) {
    quantize_4bit_blocks_simd<kIn, QuantType::kNF4>(in, n, blocksize, packed, absmax, block_begin, block_end);
  } else {
    quantize_4bit_blocks_simd<kIn, QuantType::kFP4>(in, n, blocksize, packed, absmax, block_begin, block_end);
  }
}

#define BNBX_4BIT_KERNEL(name) name##_simd
#else
#define BNBX_4BIT_KERNEL(name) name##_generic
#endif

static void quantize_4bit(FloatType in_type, const void* in, int64_t n, int64_t blocksize, QuantType quant_type,
                          uint8_t* packed, float* absmax, int64_t block_begin, int64_t block_end) {
  switch (in_type) {
    case FloatType::kFloat32:
      return BNBX_4BIT_KERNEL(quantize_4bit)<FloatType::kFloat32>(in, n, blocksize, quant_type, packed, absmax, block_begin, block_end);
    case FloatType::kFloat16:
      return BNBX_4BIT_KERNEL(quantize_4bit)<FloatType::kFloat16>(in, n, blocksize, quant_type, packed, absmax, block_begin, block_end);
    case FloatType::kBFloat16:
      return BNBX_4BIT_KERNEL(quantize_4bit)<FloatType::kBFloat16>(in, n, blocksize, quant_type, packed, absmax, block_begin, block_end);
  }
}

static void dequantize_4bit(FloatType out_type, const uint8_t* packed, const float* absmax, int64_t n,
                            int64_t blocksize, QuantType quant_type, void* out, int64_t block_begin,
                            int64_t block_end) {
  switch (out_type) {
    case FloatType::kFloat32:
      return BNBX_4BIT_KERNEL(dequantize_4bit)<FloatType::kFloat32>(packed, absmax, n, blocksize, quant_type, out, block_begin, block_end);
    case FloatType::kFloat16:
      return BNBX_4BIT_KERNEL(dequantize_4bit)<FloatType::kFloat16>(packed, absmax, n, blocksize, quant_type, out, block_begin, block_end);
    case FloatType::kBFloat16:
      return BNBX_4BIT_KERNEL(dequantize_4bit)<FloatType::kBFloat16>(packed, absmax, n, blocksize, quant_type, out, block_begin, block_end);
  }
}

#undef BNBX_4BIT_KERNEL
