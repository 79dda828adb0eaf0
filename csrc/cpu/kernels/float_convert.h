// fp16 / bf16 <-> fp32 conversions without torch headers (see quantize_4bit.h). Round to nearest even, NaN
// stays NaN, the same results as c10::Half and c10::BFloat16. Included inside a per-ISA namespace.
#pragma once

static inline float bits_to_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

static inline uint32_t float_to_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  return bits;
}

static inline float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

static inline uint16_t float_to_bf16(float f) {
  const uint32_t bits = float_to_bits(f);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN, as c10::BFloat16 makes it
  const uint32_t rounding_bias = 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>((bits + rounding_bias) >> 16);
}

static inline float fp16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0x1f) return bits_to_float(sign | 0x7f800000u | (mantissa << 13));  // Inf / NaN
  if (exponent == 0) {
    // zero or subnormal: mantissa * 2^-24, exact in fp32
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
    return sign ? -magnitude : magnitude;
  }
  return bits_to_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

static inline uint16_t float_to_fp16(float f) {
  const uint32_t bits = float_to_bits(f);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t abs_bits = bits & 0x7fffffffu;
  if (abs_bits > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);   // NaN
  if (abs_bits >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to >= 65520: Inf
  if (abs_bits < 0x38800000u) {
    // result is fp16-subnormal or zero: round |f| * 2^24 to the nearest integer, ties to even
    const float scaled = bits_to_float(abs_bits) * 16777216.0f;  // exact (power of two)
    // adding 2^23 makes the FPU round to an integer with the current (nearest-even) mode
    const float rounded = (scaled + 8388608.0f) - 8388608.0f;
    return static_cast<uint16_t>(sign | static_cast<uint16_t>(rounded));
  }
  // normal: rebias the exponent and round the 13 dropped mantissa bits to nearest even
  const uint32_t rebiased = abs_bits - (112u << 23);
  const uint32_t rounded = rebiased + 0xfffu + ((rebiased >> 13) & 1u);
  return static_cast<uint16_t>(sign | (rounded >> 13));
}

template <FloatType kType>
static inline float load_as_float(const void* data, int64_t i) {
  if constexpr (kType == FloatType::kFloat32) {
    return static_cast<const float*>(data)[i];
  } else if constexpr (kType == FloatType::kFloat16) {
    return fp16_to_float(static_cast<const uint16_t*>(data)[i]);
  } else {
    return bf16_to_float(static_cast<const uint16_t*>(data)[i]);
  }
}

template <FloatType kType>
static inline void store_from_float(void* data, int64_t i, float value) {
  if constexpr (kType == FloatType::kFloat32) {
    static_cast<float*>(data)[i] = value;
  } else if constexpr (kType == FloatType::kFloat16) {
    static_cast<uint16_t*>(data)[i] = float_to_fp16(value);
  } else {
    static_cast<uint16_t*>(data)[i] = float_to_bf16(value);
  }
}
