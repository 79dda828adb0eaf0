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
      return dequantize_blockwise_generic<FloatType::kFloat32>(in, absmax, code, n, blocksize, out, block_begin, block_end);
    case FloatType::kFloat16:
      return dequantize_blockwise_generic<FloatType::kFloat16>(in, absmax, code, n, blocksize, out, block_begin, block_end);
    case FloatType::kBFloat16:
      return dequantize_blockwise_generic<FloatType::kBFloat16>(in, absmax, code, n, blocksize, out, block_begin, block_end);
  }
}
