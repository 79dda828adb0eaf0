// 4-bit blockwise quantize / dequantize, compiled once per instruction set (see kernels.h).
// The portable loops below are the C++ twin of tests/reference.py::quantize_4bit_ref; the SIMD paths must
// give the same bytes and absmax, and the tests check every instruction set against the reference.
#pragma once

#include <cfloat>
#include <cmath>
#include <limits>

// Per-block scale factor. Values are scaled by 1/absmax (a reciprocal, as bitsandbytes' CUDA kernel does).
// A block whose absmax is subnormal would overflow the reciprocal, so both sides are first multiplied by
// 2^64 (exact for powers of two). absmax == 0 gives a factor of 0, so an all-zero block stores the code of 0.
struct BlockScale {
  float prescale;     // 1, or 2^64 for subnormal absmax
  float inv_absmax;   // 1 / (absmax * prescale), 0 when absmax == 0
};

static inline BlockScale block_scale(float absmax) {
  if (absmax == 0.0f) return {1.0f, 0.0f};
  if (absmax < FLT_MIN) return {18446744073709551616.0f, 1.0f / (absmax * 18446744073709551616.0f)};
  return {1.0f, 1.0f / absmax};
}

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

template <FloatType kIn>
static void quantize_4bit_generic(const void* in, int64_t n, int64_t blocksize, QuantType quant_type,
                                  uint8_t* packed, float* absmax, int64_t block_begin, int64_t block_end) {
  for (int64_t block = block_begin; block < block_end; ++block) {
    const int64_t start = block * blocksize;
    const int64_t end = std::min(n, start + blocksize);
    bool nonfinite = false;
    const float block_max = block_absmax<kIn>(in, start, end, &nonfinite);
    if (nonfinite) {
      // NaN/Inf contract: the block's absmax is NaN, so every element of it dequantizes to NaN.
      absmax[block] = std::numeric_limits<float>::quiet_NaN();
      const uint8_t zero = zero_code(quant_type);
      for (int64_t i = start; i < end; i += 2) packed[i / 2] = static_cast<uint8_t>(zero << 4 | zero);
      continue;
    }
    absmax[block] = block_max;
    const BlockScale scale = block_scale(block_max);
    for (int64_t i = start; i < end; i += 2) {
      const uint8_t high = code_4bit(quant_type, load_as_float<kIn>(in, i) * scale.prescale * scale.inv_absmax);
      const uint8_t low = i + 1 < end
                              ? code_4bit(quant_type, load_as_float<kIn>(in, i + 1) * scale.prescale * scale.inv_absmax)
                              : zero_code(quant_type);
      packed[i / 2] = static_cast<uint8_t>(high << 4 | low);
    }
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
    const float block_max = absmax[block];
    for (int64_t i = start; i < end; ++i) {
      const uint8_t byte = packed[i / 2];
      const uint8_t code = (i & 1) ? (byte & 0x0f) : (byte >> 4);
      store_from_float<kOut>(out, i, table[code] * block_max);
    }
  }
}

static void quantize_4bit(FloatType in_type, const void* in, int64_t n, int64_t blocksize, QuantType quant_type,
                          uint8_t* packed, float* absmax, int64_t block_begin, int64_t block_end) {
  switch (in_type) {
    case FloatType::kFloat32:
      return quantize_4bit_generic<FloatType::kFloat32>(in, n, blocksize, quant_type, packed, absmax, block_begin, block_end);
    case FloatType::kFloat16:
      return quantize_4bit_generic<FloatType::kFloat16>(in, n, blocksize, quant_type, packed, absmax, block_begin, block_end);
    case FloatType::kBFloat16:
      return quantize_4bit_generic<FloatType::kBFloat16>(in, n, blocksize, quant_type, packed, absmax, block_begin, block_end);
  }
}

static void dequantize_4bit(FloatType out_type, const uint8_t* packed, const float* absmax, int64_t n,
                            int64_t blocksize, QuantType quant_type, void* out, int64_t block_begin,
                            int64_t block_end) {
  switch (out_type) {
    case FloatType::kFloat32:
      return dequantize_4bit_generic<FloatType::kFloat32>(packed, absmax, n, blocksize, quant_type, out, block_begin, block_end);
    case FloatType::kFloat16:
      return dequantize_4bit_generic<FloatType::kFloat16>(packed, absmax, n, blocksize, quant_type, out, block_begin, block_end);
    case FloatType::kBFloat16:
      return dequantize_4bit_generic<FloatType::kBFloat16>(packed, absmax, n, blocksize, quant_type, out, block_begin, block_end);
  }
}
