// CPU kernel family `fake_quant` (QAT): the range statistics and the fused quantize-dequantize of integer
// fake quantization, one table per instruction set (compiled from fake_quant_impl.h by bnbx_add_cpu_family).
// No torch headers (see kernels.h). The per-element rule is bnbx::affine_fake_quant in common/rules.h.
#pragma once

#include <cstdint>

#include "../../common/formats.h"
#include "../../common/rules.h"

namespace bnbx::cpu {

struct FakeQuantKernels {
  const char* name;  // "scalar", "avx2" or "avx512"

  // Folds in[begin, end) into a running range: *low = min(x, *low), *high = max(x, *high) (both start at 0,
  // so the range holds 0), *nonfinite |= a NaN or an Inf was seen.
  void (*range)(FloatType type, const void* in, int64_t begin, int64_t end, float* low, float* high, bool* nonfinite);
  // out[begin, end) = affine_fake_quant(in[i], params, qmin, qmax), rounded once to `type` (fp16 saturates at
  // +-65504, as int8 dequantize does). `in` and `out` have the same type. `stream`: write around the caches
  // (non-temporal stores, where the instruction set has them), for outputs too large to stay in them.
  void (*apply)(FloatType type, const void* in, void* out, int64_t begin, int64_t end, const AffineParams& params,
                float qmin, float qmax, bool stream);
};

extern const FakeQuantKernels fake_quant_scalar;
extern const FakeQuantKernels fake_quant_avx2;
extern const FakeQuantKernels fake_quant_avx512;

}  // namespace bnbx::cpu
