// Argument checks of the fake_quant family (QAT), shared by the CPU and CUDA host code; bnbx/_ops.py repeats
// them with the same words in the fake kernel, and bnbx/qat/ops.py in the Python API.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <string>

#include "checks.h"

namespace bnbx {

// The integer grid of `bits` bits: restricted [-(2^(b-1)-1), 2^(b-1)-1] or full [-2^(b-1), 2^(b-1)-1].
struct FakeQuantGrid {
  float qmin, qmax, sym_denominator;
};

inline FakeQuantGrid fake_quant_grid(int64_t bits, bool symmetric, bool full_range) {
  const float qmax = static_cast<float>((int64_t{1} << (bits - 1)) - 1);
  const float qmin = full_range ? -qmax - 1.0f : -qmax;
  // symmetric full range: torchao's amax / ((qmax - qmin) / 2); restricted: amax / qmax
  return {qmin, qmax, full_range ? (qmax - qmin) / 2.0f : qmax};
}

inline void check_fake_quantize_args(const at::Tensor& x, int64_t group_size, int64_t bits, c10::string_view mask,
                                     double clip) {
  constexpr const char* op = "fake_quantize";
  check_float_dtype(op, "x", x.scalar_type());
  TORCH_CHECK_VALUE(bits >= 2 && bits <= 8, op, ": bits must be from 2 to 8, got ", bits);
  TORCH_CHECK_VALUE(group_size >= 1, op, ": group_size must be at least 1, got ", group_size);
  TORCH_CHECK_VALUE(mask == "none" || mask == "range" || mask == "absolute", op,
                    ": mask must be 'none', 'range' or 'absolute', got '", std::string(mask), "'");
  TORCH_CHECK_VALUE(clip > 0.0, op, ": clip must be positive, got ", clip);
}

}  // namespace bnbx
