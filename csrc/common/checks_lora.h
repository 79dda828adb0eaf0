// Argument checks of the lora family (a LoRA adapter's products), shared by the CPU and CUDA host code;
// bnbx/_ops_lora.py repeats them with the same words for the fake kernels.
#pragma once

#include <cmath>

#include "checks.h"

namespace bnbx {

struct LoraShape {
  int64_t M;  // rows: the product of x's leading sizes
  int64_t K;  // in_features (lora_A's columns)
  int64_t N;  // out_features (lora_B's rows)
  int64_t r;  // the rank (lora_A's rows, lora_B's columns)
};

// x [..., K], lora_A [r, K], lora_B [N, r] (one float dtype), and y [..., N] with x's leading sizes: the base
// layer's output (lora_forward) or the gradient of the adapted output (lora_backward).
inline LoraShape check_lora_args(const char* op, const at::Tensor& x, const at::Tensor& y, const char* y_name,
                                 const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling) {
  check_float_dtype(op, "x", x.scalar_type());
  check_float_dtype(op, y_name, y.scalar_type());
  check_float_dtype(op, "lora_A", lora_A.scalar_type());
  TORCH_CHECK_TYPE(lora_B.scalar_type() == lora_A.scalar_type(), op, ": lora_B must have lora_A's dtype ",
                   dtype_name(lora_A.scalar_type()), ", got ", dtype_name(lora_B.scalar_type()));
  TORCH_CHECK_VALUE(lora_A.dim() == 2 && lora_A.size(0) >= 1, op,
                    ": lora_A must be [r, in_features] with r >= 1, got shape ", lora_A.sizes());
  const int64_t r = lora_A.size(0), K = lora_A.size(1);
  TORCH_CHECK_VALUE(lora_B.dim() == 2 && lora_B.size(1) == r, op, ": lora_B must be [out_features, ", r,
                    "] (r = lora_A's rows), got shape ", lora_B.sizes());
  const int64_t N = lora_B.size(0);
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == K, op, ": x's last dimension must equal in_features (", K,
                    ", lora_A's columns), got x of shape ", x.sizes());
  bool fits = y.dim() == x.dim() && y.size(-1) == N;
  for (int64_t d = 0; fits && d + 1 < x.dim(); ++d) fits = y.size(d) == x.size(d);
  TORCH_CHECK_VALUE(fits, op, ": ", y_name, " must have x's leading sizes and out_features (", N,
                    ", lora_B's rows) last, got ", y_name, " of shape ", y.sizes(), " for x of shape ", x.sizes());
  check_same_device(op, x, "x", y, y_name);
  check_same_device(op, x, "x", lora_A, "lora_A");
  check_same_device(op, x, "x", lora_B, "lora_B");
  TORCH_CHECK_VALUE(std::isfinite(scaling), op, ": scaling must be finite, got ", scaling);
  int64_t M = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) M *= x.size(d);
  return {M, K, N, r};
}

}  // namespace bnbx
