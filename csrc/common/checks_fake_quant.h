// Argument checks of the fake_quant family (QAT), shared by the CPU and CUDA host code; bnbx/_ops_qat.py repeats
// them with the same words for the fake kernels (bnbx/_ops.py) and the Python API (bnbx/qat/ops.py).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <cmath>
#include <sstream>
#include <string>
#include <vector>

#include "checks.h"

namespace bnbx {

// FakeQuantGrid and fake_quant_grid are in rules.h (the CUDA launchers use them without torch).

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

// --- LSQ / LSQ+ ----------------------------------------------------------------------------------------------

// How scale and offset map onto x: x is `rows` contiguous rows of `inner` elements; scale (offset) holds one
// value for all of x, or one per row. A per-row tensor, right-aligned against x, is x's leading sizes followed
// by ones: [out, 1] for a weight [out, in], [batch, tokens, 1] per token.
struct LsqLayout {
  int64_t rows, inner;
  bool scale_per_row, offset_per_row;
};

inline bool is_lsq_float(at::ScalarType dtype) { return is_supported_float(dtype) || dtype == at::kDouble; }

inline std::string shape_text(at::IntArrayRef shape) {
  std::ostringstream text;
  text << shape;
  return text.str();
}

// Whether t is a per-row tensor of x (see LsqLayout); a one-element t is per tensor and returns false.
inline bool check_lsq_param_shape(const char* op, const char* name, const at::Tensor& x, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.dim() <= x.dim(), op, ": ", name, " has more dimensions (", t.dim(), ") than x (", x.dim(), ")");
  if (t.numel() == 1) return false;
  const int64_t lead = x.dim() - t.dim();
  int64_t k = 0;  // t's sizes after the last one that is not 1, right-aligned
  for (int64_t j = 0; j < t.dim(); ++j) {
    if (t.size(j) != 1) k = lead + j + 1;
  }
  bool fits = true;
  for (int64_t j = 0; j < k; ++j) fits &= (j < lead ? 1 : t.size(j - lead)) == x.size(j);
  if (!fits) {
    std::vector<int64_t> example(static_cast<size_t>(x.dim()), 1);
    if (x.dim() > 0) example[0] = x.size(0);
    TORCH_CHECK_VALUE(false, op, ": ", name, " of shape ", shape_text(t.sizes()),
                      " must hold one value or one per row of x of shape ", shape_text(x.sizes()),
                      ": x's leading sizes followed by ones, e.g. ", shape_text(example));
  }
  return true;
}

inline LsqLayout check_fake_quantize_lsq_args(const char* op, const at::Tensor& x, const at::Tensor& scale,
                                              const at::Tensor& offset, double qmin, double qmax) {
  TORCH_CHECK_TYPE(is_lsq_float(x.scalar_type()), op, ": x must be float32, float16, bfloat16 or float64, got ",
                   dtype_name(x.scalar_type()));
  TORCH_CHECK_TYPE(is_lsq_float(scale.scalar_type()), op, ": scale must be float32, float16, bfloat16 or float64, got ",
                   dtype_name(scale.scalar_type()));
  TORCH_CHECK_TYPE(is_lsq_float(offset.scalar_type()), op,
                   ": offset must be float32, float16, bfloat16 or float64, got ", dtype_name(offset.scalar_type()));
  check_same_device(op, x, "x", scale, "scale");
  check_same_device(op, x, "x", offset, "offset");
  TORCH_CHECK_VALUE(std::isfinite(qmin) && std::isfinite(qmax) && qmin < qmax, op,
                    ": qmin and qmax must be finite with qmin < qmax, got qmin=", qmin, ", qmax=", qmax);
  const bool scale_per_row = check_lsq_param_shape(op, "scale", x, scale);
  const bool offset_per_row = check_lsq_param_shape(op, "offset", x, offset);
  TORCH_CHECK_VALUE(!scale_per_row || !offset_per_row || scale.numel() == offset.numel(), op, ": scale of shape ",
                    shape_text(scale.sizes()), " and offset of shape ", shape_text(offset.sizes()),
                    " must have as many values when both have more than one");
  const int64_t rows = scale_per_row ? scale.numel() : (offset_per_row ? offset.numel() : 1);
  return {rows, rows == 0 ? 0 : x.numel() / rows, scale_per_row, offset_per_row};
}

inline void check_fake_quantize_lsq_grad(const char* op, const at::Tensor& grad, const at::Tensor& x) {
  TORCH_CHECK_VALUE(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type(), op,
                    ": grad must have x's shape ", shape_text(x.sizes()), " and dtype ", dtype_name(x.scalar_type()),
                    ", got ", shape_text(grad.sizes()), " ", dtype_name(grad.scalar_type()));
  check_same_device(op, x, "x", grad, "grad");
}

}  // namespace bnbx
