// CPU kernel table of the int8 family (absmax and zero-point groups), one per instruction set. See
// quantize_4bit.h for how the tables are built and chosen.
#pragma once

#include <cstdint>

#include "../../common/formats.h"

namespace bnbx::cpu {

struct QuantizeInt8Kernels {
  const char* name;  // "scalar", "avx2" or "avx512"

  // int8 over contiguous groups of group_size elements (the last group may be partial); the rules are
  // int8_params_from_range and int8_code in common/rules.h: q = round(x * (1 / scale)) (+ zero point), with
  // scale = absmax / 127 (symmetric) or range / 255 (asymmetric).
  void (*quantize)(FloatType in_type, const void* in, int64_t n, int64_t group_size, bool symmetric, int8_t* q,
                   float* scale, int32_t* zero_point, int64_t group_begin, int64_t group_end);
  void (*dequantize)(FloatType out_type, const int8_t* q, const float* scale, const int32_t* zero_point, int64_t n,
                     int64_t group_size, void* out, int64_t group_begin, int64_t group_end);
};

extern const QuantizeInt8Kernels quantize_int8_scalar;
extern const QuantizeInt8Kernels quantize_int8_avx2;
extern const QuantizeInt8Kernels quantize_int8_avx512;

}  // namespace bnbx::cpu
