// Argument checks of gemm_4bit, shared by the CPU and CUDA host code; bnbx/_ops.py repeats them word for word.
#pragma once

#include <c10/util/Optional.h>

#include "checks.h"

namespace bnbx {

struct Gemm4bitArgs {
  QuantType type;
  int64_t N;       // out_features (shape[0])
  int64_t K;       // in_features (shape[1])
  int64_t blocks;  // ceil(N * K / blocksize)
  bool nested;     // absmax is uint8, decoded with nested_absmax / nested_code / nested_offset
};

inline Gemm4bitArgs check_gemm_4bit_args(const at::Tensor& A, const at::Tensor& B, const at::Tensor& absmax,
                                         int64_t blocksize, c10::string_view quant_type, at::IntArrayRef shape,
                                         const std::optional<at::Tensor>& bias,
                                         const std::optional<at::Tensor>& nested_absmax,
                                         const std::optional<at::Tensor>& nested_code,
                                         const std::optional<at::Tensor>& nested_offset, int64_t nested_blocksize) {
  constexpr const char* op = "gemm_4bit";
  check_float_dtype(op, "A", A.scalar_type());
  check_blocksize(op, blocksize);
  const QuantType type = parse_quant_type(op, quant_type);
  TORCH_CHECK_VALUE(shape.size() == 2, op, ": shape must be [out_features, in_features], got ", shape);
  const int64_t n = checked_numel(op, shape);
  const int64_t N = shape[0], K = shape[1];
  TORCH_CHECK_VALUE(A.dim() >= 1 && A.size(-1) == K, op, ": A's last dimension must equal in_features (", K,
                    "), got A of shape ", A.sizes());
  check_quant_storage(op, B.scalar_type());
  check_same_device(op, A, "A", B, "B");
  check_same_device(op, A, "A", absmax, "absmax");
  const int64_t bytes = B.numel() * static_cast<int64_t>(B.element_size());
  const int64_t needed = ceil_div(n, 2);
  TORCH_CHECK_VALUE(bytes >= needed && bytes - needed < static_cast<int64_t>(B.element_size()), op, ": B holds ", bytes,
                    " bytes of packed codes but shape ", shape, " needs ", needed);
  const int64_t blocks = ceil_div(n, blocksize);
  const bool nested = nested_absmax.has_value();
  TORCH_CHECK_VALUE(nested == nested_code.has_value() && nested == nested_offset.has_value(), op,
                    ": nested_absmax, nested_code and nested_offset must be given together");
  if (nested) {
    check_blocksize(op, nested_blocksize);
    check_block_stats(op, "absmax", absmax, blocks, at::kByte);
    check_block_stats(op, "nested_absmax", *nested_absmax, ceil_div(blocks, nested_blocksize));
    check_code(op, *nested_code);
    TORCH_CHECK_TYPE(nested_offset->scalar_type() == at::kFloat, op, ": nested_offset must be float32, got ",
                     dtype_name(nested_offset->scalar_type()));
    TORCH_CHECK_VALUE(nested_offset->numel() == 1, op, ": nested_offset must hold one value, got ",
                      nested_offset->numel());
    check_same_device(op, A, "A", *nested_absmax, "nested_absmax");
    check_same_device(op, A, "A", *nested_code, "nested_code");
    check_same_device(op, A, "A", *nested_offset, "nested_offset");
  } else {
    check_block_stats(op, "absmax", absmax, blocks);
  }
  if (bias.has_value()) {
    TORCH_CHECK_TYPE(bias->scalar_type() == A.scalar_type(), op, ": bias must have A's dtype ",
                     dtype_name(A.scalar_type()), ", got ", dtype_name(bias->scalar_type()));
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == N, op, ": bias must have shape [", N, "], got ",
                      bias->sizes());
    check_same_device(op, A, "A", *bias, "bias");
  }
  return {type, N, K, blocks, nested};
}

// The output's shape: A's with the last dimension replaced by out_features.
inline std::vector<int64_t> gemm_4bit_out_shape(const at::Tensor& A, int64_t N) {
  std::vector<int64_t> sizes = A.sizes().vec();
  sizes.back() = N;
  return sizes;
}

}  // namespace bnbx
