// Argument checks shared by the CPU and CUDA implementations of every op, so both raise the same error
// with the same words. bnbx/_checks.py repeats them (same wording) for the fake kernels; tests/test_errors.py
// asserts on the messages. User errors raise ValueError/TypeError (TORCH_CHECK_VALUE/TYPE); the device is
// already guaranteed by the dispatcher, so it is not re-checked here except between tensors.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/string_view.h>

#include <string>

#include "formats.h"
#include "rules.h"

namespace bnbx {

// dtype names as Python spells them (float32, not Float), so C++ and Python errors read the same.
inline std::string dtype_name(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return "float32";
    case at::kHalf:
      return "float16";
    case at::kBFloat16:
      return "bfloat16";
    case at::kDouble:
      return "float64";
    case at::kByte:
      return "uint8";
    case at::kChar:
      return "int8";
    case at::kShort:
      return "int16";
    case at::kInt:
      return "int32";
    case at::kLong:
      return "int64";
    case at::kBool:
      return "bool";
    default:
      return c10::toString(dtype);
  }
}

inline bool is_supported_float(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16;
}

inline FloatType to_float_type(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return FloatType::kFloat32;
    case at::kHalf:
      return FloatType::kFloat16;
    case at::kBFloat16:
      return FloatType::kBFloat16;
    default:
      TORCH_INTERNAL_ASSERT(false, "unchecked dtype ", dtype);
  }
}

inline void check_float_dtype(const char* op, const char* name, at::ScalarType dtype) {
  TORCH_CHECK_TYPE(is_supported_float(dtype), op, ": ", name, " must be float32, float16 or bfloat16, got ",
                   dtype_name(dtype));
}

// max_blocksize: kMaxBlocksize for 4-bit ops, kMaxBlocksize8bit for 8-bit blockwise ops.
inline void check_blocksize(const char* op, int64_t blocksize, int64_t max_blocksize = kMaxBlocksize) {
  const bool power_of_two = blocksize > 0 && (blocksize & (blocksize - 1)) == 0;
  TORCH_CHECK_VALUE(power_of_two && blocksize >= kMinBlocksize && blocksize <= max_blocksize, op,
                    ": blocksize must be a power of two from ", kMinBlocksize, " to ", max_blocksize, ", got ",
                    blocksize);
}

inline QuantType parse_quant_type(const char* op, c10::string_view quant_type) {
  if (quant_type == "nf4") return QuantType::kNF4;
  if (quant_type == "fp4") return QuantType::kFP4;
  TORCH_CHECK_VALUE(false, op, ": quant_type must be 'nf4' or 'fp4', got '", std::string(quant_type), "'");
}

inline void check_quant_storage(const char* op, at::ScalarType storage) {
  TORCH_CHECK_TYPE(storage == at::kByte || storage == at::kChar || is_supported_float(storage), op,
                   ": quant_storage must be uint8, int8, float16, bfloat16 or float32, got ", dtype_name(storage));
}

// numel of a shape given as a list, with every size checked (non-negative, no overflow).
inline int64_t checked_numel(const char* op, at::IntArrayRef shape) {
  int64_t n = 1;
  for (const int64_t size : shape) {
    TORCH_CHECK_VALUE(size >= 0, op, ": shape must not hold negative sizes, got ", shape);
    TORCH_CHECK_VALUE(size == 0 || n <= std::numeric_limits<int64_t>::max() / 2 / size, op, ": shape ", shape,
                      " has too many elements");
    n *= size;
  }
  return n;
}

inline void check_same_device(const char* op, const at::Tensor& a, const char* a_name, const at::Tensor& b,
                              const char* b_name) {
  TORCH_CHECK(a.device() == b.device(), op, ": expected all tensors on the same device, got ", a_name, " on ",
              a.device(), " and ", b_name, " on ", b.device());
}

// The absmax (or scale) vector of a blockwise format: fp32, one value per block.
inline void check_block_stats(const char* op, const char* name, const at::Tensor& stats, int64_t expected,
                              at::ScalarType dtype = at::kFloat) {
  TORCH_CHECK_TYPE(stats.scalar_type() == dtype, op, ": ", name, " must be ", dtype_name(dtype), ", got ",
                   dtype_name(stats.scalar_type()));
  TORCH_CHECK_VALUE(stats.numel() == expected, op, ": ", name, " must hold one value per block (", expected,
                    " values), got ", stats.numel());
}

// Bytes of packed storage for n 4-bit codes, rounded up to whole quant_storage elements.
inline int64_t packed_4bit_bytes(int64_t n, int64_t storage_itemsize) {
  return ceil_div(ceil_div(n, 2), storage_itemsize) * storage_itemsize;
}

inline QuantType check_quantize_4bit_args(const at::Tensor& A, int64_t blocksize, c10::string_view quant_type,
                                          at::ScalarType quant_storage) {
  constexpr const char* op = "quantize_4bit";
  check_float_dtype(op, "A", A.scalar_type());
  check_blocksize(op, blocksize);
  check_quant_storage(op, quant_storage);
  return parse_quant_type(op, quant_type);
}

// Outputs of quantize_4bit, allocated the same way by every backend: packed bytes (padding to whole
// quant_storage elements zeroed, so they are deterministic) and one fp32 absmax per block.
struct Quantize4bitOutputs {
  at::Tensor packed;  // uint8 [bytes]
  at::Tensor absmax;  // fp32 [ceil(n / blocksize)]
  at::ScalarType storage;

  // allocate_packed: how the packed bytes are allocated (the CPU passes cpu::empty_output); at::empty if null
  Quantize4bitOutputs(const at::Tensor& input, int64_t blocksize, at::ScalarType quant_storage,
                      at::Tensor (*allocate_packed)(at::IntArrayRef, const at::TensorOptions&) = nullptr)
      : storage(quant_storage) {
    const int64_t n = input.numel();
    const int64_t bytes = packed_4bit_bytes(n, static_cast<int64_t>(c10::elementSize(quant_storage)));
    const at::TensorOptions byte_options = input.options().dtype(at::kByte);
    packed = allocate_packed != nullptr ? allocate_packed({bytes}, byte_options) : at::empty({bytes}, byte_options);
    absmax = at::empty({ceil_div(n, blocksize)}, input.options().dtype(at::kFloat));
    if (bytes > ceil_div(n, 2)) packed.narrow(0, ceil_div(n, 2), bytes - ceil_div(n, 2)).zero_();
  }

  // The op's result: the packed bytes as a [elements, 1] column of quant_storage (bitsandbytes' shape).
  std::tuple<at::Tensor, at::Tensor> result() const {
    const int64_t itemsize = static_cast<int64_t>(c10::elementSize(storage));
    return {packed.view(storage).view({packed.numel() / itemsize, 1}), absmax};
  }
};

// Checks the packed codes and absmax against the shape they claim to describe; returns numel.
inline int64_t check_dequantize_4bit_args(const at::Tensor& A, const at::Tensor& absmax, int64_t blocksize,
                                          c10::string_view quant_type, at::IntArrayRef shape, at::ScalarType dtype,
                                          QuantType* type) {
  constexpr const char* op = "dequantize_4bit";
  check_blocksize(op, blocksize);
  *type = parse_quant_type(op, quant_type);
  check_float_dtype(op, "dtype", dtype);
  check_quant_storage(op, A.scalar_type());
  check_same_device(op, A, "A", absmax, "absmax");
  const int64_t n = checked_numel(op, shape);
  const int64_t bytes = A.numel() * static_cast<int64_t>(A.element_size());
  const int64_t needed = ceil_div(n, 2);
  TORCH_CHECK_VALUE(bytes >= needed && bytes - needed < static_cast<int64_t>(A.element_size()), op, ": A holds ", bytes,
                    " bytes of packed codes but shape ", shape, " needs ", needed);
  check_block_stats(op, "absmax", absmax, ceil_div(n, blocksize));
  return n;
}

// The `out` tensor of dequantize_4bit.out: the promised shape and dtype, contiguous, next to A.
inline void check_dequantize_4bit_out(const at::Tensor& A, at::IntArrayRef shape, at::ScalarType dtype,
                                      const at::Tensor& out) {
  constexpr const char* op = "dequantize_4bit";
  TORCH_CHECK_VALUE(out.sizes() == shape && out.scalar_type() == dtype, op, ": out must have shape ", shape,
                    " and dtype ", dtype_name(dtype), ", got ", out.sizes(), " and ", dtype_name(out.scalar_type()));
  TORCH_CHECK_VALUE(out.is_contiguous(), op, ": out must be contiguous");
  check_same_device(op, A, "A", out, "out");
}

inline void check_code(const char* op, const at::Tensor& code) {
  TORCH_CHECK_TYPE(code.scalar_type() == at::kFloat, op, ": code must be float32, got ",
                   dtype_name(code.scalar_type()));
  TORCH_CHECK_VALUE(code.numel() == kDynamicMapSize, op, ": code must hold 256 values, got ", code.numel());
}

inline void check_quantize_blockwise_args(const at::Tensor& A, const at::Tensor& code, int64_t blocksize) {
  constexpr const char* op = "quantize_blockwise";
  check_float_dtype(op, "A", A.scalar_type());
  check_blocksize(op, blocksize, kMaxBlocksize8bit);
  check_code(op, code);
  check_same_device(op, A, "A", code, "code");
}

inline void check_double_quantize_args(const at::Tensor& absmax, const at::Tensor& code, int64_t blocksize) {
  constexpr const char* op = "double_quantize";
  TORCH_CHECK_TYPE(absmax.scalar_type() == at::kFloat, op, ": absmax must be float32, got ",
                   dtype_name(absmax.scalar_type()));
  check_blocksize(op, blocksize, kMaxBlocksize8bit);
  check_code(op, code);
  check_same_device(op, absmax, "absmax", code, "code");
}

inline void check_dequantize_blockwise_args(const at::Tensor& A, const at::Tensor& absmax, const at::Tensor& code,
                                            int64_t blocksize, at::ScalarType dtype) {
  constexpr const char* op = "dequantize_blockwise";
  TORCH_CHECK_TYPE(A.scalar_type() == at::kByte, op, ": A must be uint8 codes, got ", dtype_name(A.scalar_type()));
  check_blocksize(op, blocksize, kMaxBlocksize8bit);
  check_code(op, code);
  check_float_dtype(op, "dtype", dtype);
  check_same_device(op, A, "A", absmax, "absmax");
  check_same_device(op, A, "A", code, "code");
  check_block_stats(op, "absmax", absmax, ceil_div(A.numel(), blocksize));
}

inline void check_group_size(const char* op, int64_t group_size) {
  TORCH_CHECK_VALUE(group_size >= 1, op, ": group_size must be at least 1, got ", group_size);
}

inline void check_quantize_int8_args(const at::Tensor& A, int64_t group_size) {
  constexpr const char* op = "quantize_int8";
  check_float_dtype(op, "A", A.scalar_type());
  check_group_size(op, group_size);
}

inline void check_dequantize_int8_args(const at::Tensor& A, const at::Tensor& scale, const at::Tensor& zero_point,
                                       int64_t group_size, at::ScalarType dtype) {
  constexpr const char* op = "dequantize_int8";
  TORCH_CHECK_TYPE(A.scalar_type() == at::kChar, op, ": A must be int8, got ", dtype_name(A.scalar_type()));
  check_group_size(op, group_size);
  check_float_dtype(op, "dtype", dtype);
  check_same_device(op, A, "A", scale, "scale");
  check_same_device(op, A, "A", zero_point, "zero_point");
  const int64_t groups = ceil_div(A.numel(), group_size);
  check_block_stats(op, "scale", scale, groups);
  check_block_stats(op, "zero_point", zero_point, groups, at::kInt);
}

}  // namespace bnbx
