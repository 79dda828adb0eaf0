// Argument checks of the LLM.int8() ops (int8_vectorwise_quant, int8_vectorwise_dequant, int8_linear_matmul,
// int8_mm_dequant, int8_mixed_linear), shared by the CPU and CUDA host code. bnbx/_ops.py repeats them word
// for word in the fake kernels.
#pragma once

#include <c10/util/accumulate.h>

#include <cmath>

#include "checks.h"

namespace bnbx {

// K at most 2^17 - 1: |sum of K products of int8| <= 128 * 128 * K stays inside int32.
constexpr int64_t kInt8MaxK = (int64_t{1} << 17) - 1;

// Rows of the matrix view of A: the product of all but its last dimension.
inline int64_t int8_rows(const at::Tensor& A) { return c10::multiply_integers(A.sizes().slice(0, A.dim() - 1)); }

inline void check_threshold(const char* op, double threshold) {
  TORCH_CHECK_VALUE(!std::isnan(threshold) && threshold >= 0.0, op,
                    ": threshold must be >= 0 (0 disables outlier columns), got ", threshold);
}

inline int64_t check_int8_rows(const char* op, const char* name, const at::Tensor& A, at::ScalarType dtype) {
  TORCH_CHECK_TYPE(A.scalar_type() == dtype, op, ": ", name, " must be ", dtype_name(dtype), ", got ",
                   dtype_name(A.scalar_type()));
  TORCH_CHECK_VALUE(A.dim() >= 1, op, ": ", name, " must have at least one dimension, got a scalar");
  return A.size(-1);
}

inline void check_stats(const char* op, const char* name, const at::Tensor& stats, int64_t expected,
                        const at::Tensor& A) {
  TORCH_CHECK_TYPE(stats.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ",
                   dtype_name(stats.scalar_type()));
  TORCH_CHECK_VALUE(stats.numel() == expected, op, ": ", name, " must hold ", expected, " values, got ", stats.numel());
  TORCH_CHECK(stats.device() == A.device(), op, ": expected all tensors on the same device, got A on ", A.device(),
              " and ", name, " on ", stats.device());
}

inline void check_int8_vectorwise_quant_args(const at::Tensor& A, double threshold) {
  const char* op = "int8_vectorwise_quant";
  check_float_dtype(op, "A", A.scalar_type());
  TORCH_CHECK_VALUE(A.dim() >= 1, op, ": A must have at least one dimension, got a scalar");
  check_threshold(op, threshold);
}

inline void check_int8_vectorwise_dequant_args(const at::Tensor& A, const at::Tensor& stats) {
  const char* op = "int8_vectorwise_dequant";
  check_int8_rows(op, "A", A, at::kChar);
  check_stats(op, "stats", stats, int8_rows(A), A);
}

// B is the weight, [N, K] row-major as nn.Linear stores it (C = A @ B^T).
inline void check_int8_weight(const char* op, const char* name, const at::Tensor& B, int64_t K, const at::Tensor& A) {
  TORCH_CHECK_TYPE(B.scalar_type() == at::kChar, op, ": ", name, " must be int8, got ", dtype_name(B.scalar_type()));
  TORCH_CHECK_VALUE(B.dim() == 2, op, ": ", name, " must be 2-D [N, K], got ", B.dim(), " dimensions");
  TORCH_CHECK_VALUE(B.size(1) == K, op, ": ", name, " must be [N, K] with K = A.shape[-1] = ", K, ", got ", B.sizes());
  TORCH_CHECK_VALUE(K <= kInt8MaxK, op, ": K must be at most ", kInt8MaxK, " so int32 sums cannot overflow, got ", K);
  TORCH_CHECK(B.device() == A.device(), op, ": expected all tensors on the same device, got A on ", A.device(), " and ",
              name, " on ", B.device());
}

inline void check_int8_linear_matmul_args(const at::Tensor& A, const at::Tensor& B) {
  const char* op = "int8_linear_matmul";
  const int64_t K = check_int8_rows(op, "A", A, at::kChar);
  check_int8_weight(op, "B", B, K, A);
}

inline void check_bias(const char* op, const c10::optional<at::Tensor>& bias, int64_t N, const at::Tensor& A) {
  if (!bias.has_value()) return;
  check_float_dtype(op, "bias", bias->scalar_type());
  TORCH_CHECK_VALUE(bias->numel() == N, op, ": bias must hold N = ", N, " values, got ", bias->numel());
  TORCH_CHECK(bias->device() == A.device(), op, ": expected all tensors on the same device, got A on ", A.device(),
              " and bias on ", bias->device());
}

inline void check_int8_mm_dequant_args(const at::Tensor& A, const at::Tensor& row_stats, const at::Tensor& col_stats,
                                       at::ScalarType dtype, const c10::optional<at::Tensor>& bias) {
  const char* op = "int8_mm_dequant";
  const int64_t N = check_int8_rows(op, "A", A, at::kInt);
  check_stats(op, "row_stats", row_stats, int8_rows(A), A);
  check_stats(op, "col_stats", col_stats, N, A);
  check_float_dtype(op, "dtype", dtype);
  check_bias(op, bias, N, A);
}

inline void check_int8_mixed_linear_args(const at::Tensor& A, const at::Tensor& CB, const at::Tensor& SCB,
                                         const c10::optional<at::Tensor>& bias, double threshold,
                                         const char* op = "int8_mixed_linear") {
  check_float_dtype(op, "A", A.scalar_type());
  TORCH_CHECK_VALUE(A.dim() >= 1, op, ": A must have at least one dimension, got a scalar");
  check_int8_weight(op, "CB", CB, A.size(-1), A);
  check_stats(op, "SCB", SCB, CB.size(0), A);
  check_bias(op, bias, CB.size(0), A);
  check_threshold(op, threshold);
}

inline void check_int8_pack_weight_args(const at::Tensor& CB) {
  const char* op = "int8_pack_weight";
  TORCH_CHECK_TYPE(CB.scalar_type() == at::kChar, op, ": CB must be int8, got ", dtype_name(CB.scalar_type()));
  TORCH_CHECK_VALUE(CB.dim() == 2, op, ": CB must be 2-D [N, K], got ", CB.dim(), " dimensions");
  TORCH_CHECK_VALUE(CB.size(1) <= kInt8MaxK, op, ": K must be at most ", kInt8MaxK,
                    " so int32 sums cannot overflow, got ", CB.size(1));
}

// packed_CB: int8_pack_weight's output for CB, expected_bytes long (-1: this CPU has no packed layout).
inline void check_int8_packed_weight(const char* op, const at::Tensor& packed_CB, int64_t expected_bytes,
                                     const at::Tensor& A) {
  TORCH_CHECK_TYPE(packed_CB.scalar_type() == at::kByte, op, ": packed_CB must be uint8 (from int8_pack_weight), got ",
                   dtype_name(packed_CB.scalar_type()));
  TORCH_CHECK_VALUE(packed_CB.dim() == 1 && (expected_bytes < 0 || packed_CB.numel() == expected_bytes), op,
                    ": packed_CB must hold int8_pack_weight(CB)'s ", expected_bytes, " bytes, got shape ",
                    packed_CB.sizes());
  TORCH_CHECK(packed_CB.device() == A.device(), op, ": expected all tensors on the same device, got A on ", A.device(),
              " and packed_CB on ", packed_CB.device());
}

// The threshold compared in the input's precision, as bitsandbytes' `A.abs() >= threshold` does.
inline float threshold_in_dtype(double threshold, at::ScalarType dtype) {
  if (dtype == at::kHalf) return static_cast<float>(c10::Half(static_cast<float>(threshold)));
  if (dtype == at::kBFloat16) return static_cast<float>(c10::BFloat16(static_cast<float>(threshold)));
  return static_cast<float>(threshold);
}

}  // namespace bnbx
