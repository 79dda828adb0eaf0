// CPU kernel table of the 8-bit blockwise family (a sorted 256-value code, the signed dynamic map by
// default; also double quantization of 4-bit absmax values), one per instruction set. See quantize_4bit.h
// for how the tables are built and chosen.
#pragma once

#include <cstdint>

#include "../../common/formats.h"

namespace bnbx::cpu {

struct Quantize8bitKernels {
  const char* name;  // "scalar", "avx2" or "avx512"

  // in[n] -> out[n] codes, absmax[ceil(n/blocksize)]; the code of x * (1 / absmax) by bitsandbytes' CUDA
  // search (dynamic_code_index, common/rules.h).
  void (*quantize)(FloatType in_type, const void* in, int64_t n, int64_t blocksize, const float* code, uint8_t* out,
                   float* absmax, int64_t block_begin, int64_t block_end);
  void (*dequantize)(FloatType out_type, const uint8_t* in, const float* absmax, const float* code, int64_t n,
                     int64_t blocksize, void* out, int64_t block_begin, int64_t block_end);
  // Sum (in double) and count of the non-NaN values of in[begin, end): double quantization's mean.
  void (*nan_sum)(const float* in, int64_t begin, int64_t end, double* sum, int64_t* count);
};

extern const Quantize8bitKernels quantize_8bit_scalar;
extern const Quantize8bitKernels quantize_8bit_avx2;
extern const Quantize8bitKernels quantize_8bit_avx512;

}  // namespace bnbx::cpu
