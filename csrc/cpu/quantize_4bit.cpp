// CPU host code for the 4-bit ops: checks, output allocation, and the split over threads. The arithmetic
// lives in kernels/quantize_4bit_impl.h, compiled once per instruction set.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../common/checks.h"
#include "cpu_features.h"
#include "fresh_output.h"
#include "kernels/quantize_4bit.h"

namespace bnbx {
namespace {

std::tuple<at::Tensor, at::Tensor> quantize_4bit_cpu(const at::Tensor& A, int64_t blocksize,
                                                     c10::string_view quant_type, at::ScalarType quant_storage) {
  const QuantType type = check_quantize_4bit_args(A, blocksize, quant_type, quant_storage);
  const at::Tensor input = A.contiguous();
  const int64_t n = input.numel();
  const int64_t blocks = ceil_div(n, blocksize);
  Quantize4bitOutputs outputs(input, blocksize, quant_storage, &cpu::empty_output);

  const cpu::Quantize4bitKernels& kernels =
      cpu::select_kernels(cpu::quantize_4bit_scalar, cpu::quantize_4bit_avx2, cpu::quantize_4bit_avx512);
  const FloatType in_type = to_float_type(input.scalar_type());
  const void* in = input.const_data_ptr();
  uint8_t* packed_ptr = outputs.packed.mutable_data_ptr<uint8_t>();
  float* absmax_ptr = outputs.absmax.mutable_data_ptr<float>();
  at::parallel_for(0, blocks, grain_in_blocks(blocksize), [&](int64_t begin, int64_t end) {
    kernels.quantize(in_type, in, n, blocksize, type, packed_ptr, absmax_ptr, begin, end);
  });
  return outputs.result();
}

// Runs the kernel; the arguments are already checked.
void dequantize_4bit_into(const at::Tensor& A, const at::Tensor& absmax, int64_t n, int64_t blocksize, QuantType type,
                          at::ScalarType dtype, at::Tensor& out) {
  const at::Tensor packed = A.contiguous();
  const at::Tensor stats = absmax.contiguous();
  const cpu::Quantize4bitKernels& kernels =
      cpu::select_kernels(cpu::quantize_4bit_scalar, cpu::quantize_4bit_avx2, cpu::quantize_4bit_avx512);
  const FloatType out_type = to_float_type(dtype);
  const uint8_t* packed_ptr = static_cast<const uint8_t*>(packed.const_data_ptr());
  const float* absmax_ptr = stats.const_data_ptr<float>();
  void* out_ptr = out.mutable_data_ptr();
  at::parallel_for(0, ceil_div(n, blocksize), grain_in_blocks(blocksize), [&](int64_t begin, int64_t end) {
    kernels.dequantize(out_type, packed_ptr, absmax_ptr, n, blocksize, type, out_ptr, begin, end);
  });
}

void dequantize_4bit_out_cpu(const at::Tensor& A, const at::Tensor& absmax, int64_t blocksize,
                             c10::string_view quant_type, at::IntArrayRef shape, at::ScalarType dtype,
                             at::Tensor& out) {
  QuantType type;
  const int64_t n = check_dequantize_4bit_args(A, absmax, blocksize, quant_type, shape, dtype, &type);
  check_dequantize_4bit_out(A, shape, dtype, out);
  dequantize_4bit_into(A, absmax, n, blocksize, type, dtype, out);
}

at::Tensor dequantize_4bit_cpu(const at::Tensor& A, const at::Tensor& absmax, int64_t blocksize,
                               c10::string_view quant_type, at::IntArrayRef shape, at::ScalarType dtype) {
  QuantType type;
  const int64_t n = check_dequantize_4bit_args(A, absmax, blocksize, quant_type, shape, dtype, &type);
  at::Tensor out = cpu::empty_output(shape, A.options().dtype(dtype));
  dequantize_4bit_into(A, absmax, n, blocksize, type, dtype, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(bnbx, CPU, m) {
  m.impl("quantize_4bit", &quantize_4bit_cpu);
  m.impl("dequantize_4bit", &dequantize_4bit_cpu);
  m.impl("dequantize_4bit.out", &dequantize_4bit_out_cpu);
}

}  // namespace bnbx
