// int8 absmax (symmetric) and zero-point (asymmetric) quantization over contiguous groups, compiled once per
// instruction set (see kernels.h). C++ twin of tests/reference.py::quantize_int8_ref.
#pragma once

// Group scale and zero point, torch's affine convention: x ~ (q - zero_point) * scale.
struct Int8Params {
  float scale;
  float inv_scale;  // 1 / scale; 0 for an all-zero group
  int32_t zero_point;
  bool nonfinite;
};

template <FloatType kIn>
static inline Int8Params int8_group_params(const void* in, int64_t start, int64_t end, bool symmetric) {
  float low = 0.0f, high = 0.0f;  // the range always holds 0, so 0 is exact
  bool bad = false;
  for (int64_t i = start; i < end; ++i) {
    const float x = load_as_float<kIn>(in, i);
    bad |= !(std::fabs(x) <= FLT_MAX);
    low = x < low ? x : low;
    high = x > high ? x : high;
  }
  if (bad) return {std::numeric_limits<float>::quiet_NaN(), 0.0f, 0, true};
  if (symmetric) {
    const float absmax = std::max(-low, high);
    const float scale = absmax / 127.0f;
    return {scale, scale == 0.0f ? 0.0f : 1.0f / scale, 0, false};
  }
  const float scale = (high - low) / 255.0f;
  if (scale == 0.0f) return {0.0f, 0.0f, 0, false};
  const float zero_point = std::nearbyint(-128.0f - low / scale);
  return {scale, 1.0f / scale, static_cast<int32_t>(std::min(127.0f, std::max(-128.0f, zero_point))), false};
}

template <FloatType kIn>
static void quantize_int8_generic(const void* in, int64_t n, int64_t group_size, bool symmetric, int8_t* q,
                                  float* scale, int32_t* zero_point, int64_t group_begin, int64_t group_end) {
  const float qmin = symmetric ? -127.0f : -128.0f;
  for (int64_t group = group_begin; group < group_end; ++group) {
    const int64_t start = group * group_size;
    const int64_t end = std::min(n, start + group_size);
    const Int8Params params = int8_group_params<kIn>(in, start, end, symmetric);
    scale[group] = params.scale;
    zero_point[group] = params.zero_point;
    if (params.nonfinite) {
      // NaN/Inf contract: scale NaN, zero point 0, q 0 (x * 0 would still turn a NaN or an Inf into qmin)
      std::fill(q + start, q + end, int8_t{0});
      continue;
    }
    const float zp = static_cast<float>(params.zero_point);
    if (std::isinf(params.inv_scale)) {
      // subnormal scale: 1/scale overflows, so divide instead (exact, slower, rare)
      for (int64_t i = start; i < end; ++i) {
        const float value = std::nearbyint(load_as_float<kIn>(in, i) / params.scale) + zp;
        q[i] = static_cast<int8_t>(std::min(127.0f, std::max(qmin, value)));
      }
      continue;
    }
    for (int64_t i = start; i < end; ++i) {
      const float value = std::nearbyint(load_as_float<kIn>(in, i) * params.inv_scale) + zp;
      q[i] = static_cast<int8_t>(std::min(127.0f, std::max(qmin, value)));
    }
  }
}

template <FloatType kOut>
static void dequantize_int8_generic(const int8_t* q, const float* scale, const int32_t* zero_point, int64_t n,
                                    int64_t group_size, void* out, int64_t group_begin, int64_t group_end) {
  for (int64_t group = group_begin; group < group_end; ++group) {
    const int64_t start = group * group_size;
    const int64_t end = std::min(n, start + group_size);
    const float group_scale = scale[group];
    const float zp = static_cast<float>(zero_point[group]);
    // Zero-point rounding can rebuild up to half a step past the original maximum; in fp16 that can pass
    // 65504, so fp16 output saturates to its finite range (NaN stays NaN: std::min/max keep their first argument).
    constexpr float kLimit = kOut == FloatType::kFloat16 ? 65504.0f : FLT_MAX;
    for (int64_t i = start; i < end; ++i) {
      const float value = (static_cast<float>(q[i]) - zp) * group_scale;
      store_from_float<kOut>(out, i, std::max(std::min(value, kLimit), -kLimit));
    }
  }
}

static void quantize_int8(FloatType in_type, const void* in, int64_t n, int64_t group_size, bool symmetric, int8_t* q,
                          float* scale, int32_t* zero_point, int64_t group_begin, int64_t group_end) {
  switch (in_type) {
    case FloatType::kFloat32:
      return quantize_int8_generic<FloatType::kFloat32>(in, n, group_size, symmetric, q, scale, zero_point, group_begin, group_end);
    case FloatType::kFloat16:
      return quantize_int8_generic<FloatType::kFloat16>(in, n, group_size, symmetric, q, scale, zero_point, group_begin, group_end);
    case FloatType::kBFloat16:
      return quantize_int8_generic<FloatType::kBFloat16>(in, n, group_size, symmetric, q, scale, zero_point, group_begin, group_end);
  }
}

static void dequantize_int8(FloatType out_type, const int8_t* q, const float* scale, const int32_t* zero_point,
                            int64_t n, int64_t group_size, void* out, int64_t group_begin, int64_t group_end) {
  switch (out_type) {
    case FloatType::kFloat32:
      return dequantize_int8_generic<FloatType::kFloat32>(q, scale, zero_point, n, group_size, out, group_begin, group_end);
    case FloatType::kFloat16:
      return dequantize_int8_generic<FloatType::kFloat16>(q, scale, zero_point, n, group_size, out, group_begin, group_end);
    case FloatType::kBFloat16:
      return dequantize_int8_generic<FloatType::kBFloat16>(q, scale, zero_point, n, group_size, out, group_begin, group_end);
  }
}
