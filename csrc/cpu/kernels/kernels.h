// CPU kernel table: one set of kernels per instruction set, chosen once per process.
//
// Each kernel family is written once in a *_impl.h header and compiled three times (kernels_scalar.cpp,
// kernels_avx2.cpp, kernels_avx512.cpp), each with its own compiler flags and inside its own namespace,
// the way ATen's DispatchStub builds one source per CPU capability. These units include no torch headers:
// torch's inline functions compiled with AVX-512 flags could otherwise be picked by the linker for the
// scalar path and fault on an AVX2-only CPU (the one-definition-rule trap).
//
// Every kernel works on a range of blocks [block_begin, block_end) of a flat, contiguous tensor, so the
// host code can split the work with at::parallel_for.
#pragma once

#include <cstdint>

#include "../../common/formats.h"
#include "../../common/rules.h"

namespace bnbx::cpu {

struct CpuKernels {
  const char* name;  // "scalar", "avx2" or "avx512"

  // 4-bit: in[n] -> packed[ceil(n/2)] (element 2j in the high nibble), absmax[ceil(n/blocksize)].
  // blocksize is even, so every block starts on a byte boundary.
  void (*quantize_4bit)(FloatType in_type, const void* in, int64_t n, int64_t blocksize, QuantType quant_type,
                        uint8_t* packed, float* absmax, int64_t block_begin, int64_t block_end);
  void (*dequantize_4bit)(FloatType out_type, const uint8_t* packed, const float* absmax, int64_t n,
                          int64_t blocksize, QuantType quant_type, void* out, int64_t block_begin,
                          int64_t block_end);

  // 8-bit blockwise with a 256-entry sorted code (the signed dynamic map by default): nearest code.
  void (*quantize_blockwise)(FloatType in_type, const void* in, int64_t n, int64_t blocksize, const float* code,
                             uint8_t* out, float* absmax, int64_t block_begin, int64_t block_end);
  void (*dequantize_blockwise)(FloatType out_type, const uint8_t* in, const float* absmax, const float* code,
                               int64_t n, int64_t blocksize, void* out, int64_t block_begin, int64_t block_end);

  // int8 over contiguous groups of group_size elements (the last group may be partial).
  // symmetric: scale = absmax / 127, q = round(x * (127 / absmax)) in [-127, 127], zero_point = 0.
  // asymmetric: range [min(x, 0), max(x, 0)], scale = range / 255, q = clamp(round(x / scale) + zp, -128, 127).
  void (*quantize_int8)(FloatType in_type, const void* in, int64_t n, int64_t group_size, bool symmetric,
                        int8_t* q, float* scale, int32_t* zero_point, int64_t group_begin, int64_t group_end);
  void (*dequantize_int8)(FloatType out_type, const int8_t* q, const float* scale, const int32_t* zero_point,
                          int64_t n, int64_t group_size, void* out, int64_t group_begin, int64_t group_end);
};

extern const CpuKernels kernels_scalar;
extern const CpuKernels kernels_avx2;
extern const CpuKernels kernels_avx512;

}  // namespace bnbx::cpu
