// CPU host code for 8-bit blockwise quantization (used for double quantization of 4-bit absmax values).
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <torch/library.h>

#include <vector>

#include "../common/checks.h"
#include "cpu_features.h"
#include "fresh_output.h"
#include "kernels/quantize_8bit.h"

namespace bnbx {
namespace {

void check_code_sorted(const at::Tensor& code) {
  const float* values = code.const_data_ptr<float>();
  for (int i = 0; i + 1 < kDynamicMapSize; ++i) {
    TORCH_CHECK_VALUE(values[i] <= values[i + 1], "quantize_blockwise: code must be sorted in increasing order");
  }
}

std::tuple<at::Tensor, at::Tensor> quantize_blockwise_cpu(const at::Tensor& A, const at::Tensor& code,
                                                          int64_t blocksize) {
  check_quantize_blockwise_args(A, code, blocksize);
  const at::Tensor input = A.contiguous();
  const at::Tensor code_values = code.contiguous();
  check_code_sorted(code_values);
  const int64_t n = input.numel();
  const int64_t blocks = ceil_div(n, blocksize);
  at::Tensor out = cpu::empty_output(input.sizes(), input.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({blocks}, input.options().dtype(at::kFloat));

  const cpu::Quantize8bitKernels& kernels =
      cpu::select_kernels(cpu::quantize_8bit_scalar, cpu::quantize_8bit_avx2, cpu::quantize_8bit_avx512);
  const FloatType in_type = to_float_type(input.scalar_type());
  const void* in = input.const_data_ptr();
  const float* code_ptr = code_values.const_data_ptr<float>();
  uint8_t* out_ptr = out.mutable_data_ptr<uint8_t>();
  float* absmax_ptr = absmax.mutable_data_ptr<float>();
  at::parallel_for(0, blocks, grain_in_blocks(blocksize), [&](int64_t begin, int64_t end) {
    kernels.quantize(in_type, in, n, blocksize, code_ptr, out_ptr, absmax_ptr, begin, end);
  });
  return {out, absmax};
}

// Double quantization in one op: the mean of the non-NaN absmax values, then absmax - mean coded 8-bit.
// The sum runs in double over fixed chunks added in chunk order, so the offset does not depend on the
// thread count; a NaN absmax (a block with NaN/Inf) stays NaN and spoils only its nested block.
std::tuple<at::Tensor, at::Tensor, at::Tensor> double_quantize_cpu(const at::Tensor& absmax, const at::Tensor& code,
                                                                   int64_t blocksize) {
  check_double_quantize_args(absmax, code, blocksize);
  const at::Tensor values = absmax.contiguous();
  const at::Tensor code_values = code.contiguous();
  check_code_sorted(code_values);
  const int64_t n = values.numel();
  const float* in = values.const_data_ptr<float>();

  const cpu::Quantize8bitKernels& kernels =
      cpu::select_kernels(cpu::quantize_8bit_scalar, cpu::quantize_8bit_avx2, cpu::quantize_8bit_avx512);
  constexpr int64_t kChunk = 1 << 16;
  const int64_t chunks = ceil_div(n, kChunk);
  std::vector<double> sums(static_cast<size_t>(chunks));
  std::vector<int64_t> counts(static_cast<size_t>(chunks));
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c)
      kernels.nan_sum(in, c * kChunk, std::min(n, (c + 1) * kChunk), &sums[c], &counts[c]);
  });
  double sum = 0.0;
  int64_t count = 0;
  for (int64_t c = 0; c < chunks; ++c) {
    sum += sums[c];
    count += counts[c];
  }
  const float offset = double_quantize_offset(sum, count);

  const int64_t blocks = ceil_div(n, blocksize);
  at::Tensor shifted = at::empty({n}, values.options());
  float* shifted_ptr = shifted.mutable_data_ptr<float>();
  at::Tensor out = at::empty(values.sizes(), values.options().dtype(at::kByte));
  at::Tensor absmax2 = at::empty({blocks}, values.options());
  const float* code_ptr = code_values.const_data_ptr<float>();
  uint8_t* out_ptr = out.mutable_data_ptr<uint8_t>();
  float* absmax2_ptr = absmax2.mutable_data_ptr<float>();
  at::parallel_for(0, blocks, grain_in_blocks(blocksize), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin * blocksize, stop = std::min(n, end * blocksize); i < stop; ++i) {
      shifted_ptr[i] = in[i] - offset;
    }
    kernels.quantize(FloatType::kFloat32, shifted_ptr, n, blocksize, code_ptr, out_ptr, absmax2_ptr, begin, end);
  });
  return {out, absmax2, at::full({}, offset, values.options())};
}

at::Tensor dequantize_blockwise_cpu(const at::Tensor& A, const at::Tensor& absmax, const at::Tensor& code,
                                    int64_t blocksize, at::ScalarType dtype) {
  check_dequantize_blockwise_args(A, absmax, code, blocksize, dtype);
  const at::Tensor codes = A.contiguous();
  const at::Tensor stats = absmax.contiguous();
  const at::Tensor code_values = code.contiguous();
  const int64_t n = codes.numel();
  at::Tensor out = cpu::empty_output(codes.sizes(), codes.options().dtype(dtype));

  const cpu::Quantize8bitKernels& kernels =
      cpu::select_kernels(cpu::quantize_8bit_scalar, cpu::quantize_8bit_avx2, cpu::quantize_8bit_avx512);
  const FloatType out_type = to_float_type(dtype);
  const uint8_t* in = codes.const_data_ptr<uint8_t>();
  const float* absmax_ptr = stats.const_data_ptr<float>();
  const float* code_ptr = code_values.const_data_ptr<float>();
  void* out_ptr = out.mutable_data_ptr();
  at::parallel_for(0, ceil_div(n, blocksize), grain_in_blocks(blocksize), [&](int64_t begin, int64_t end) {
    kernels.dequantize(out_type, in, absmax_ptr, code_ptr, n, blocksize, out_ptr, begin, end);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(bnbx, CPU, m) {
  m.impl("quantize_blockwise", &quantize_blockwise_cpu);
  m.impl("dequantize_blockwise", &dequantize_blockwise_cpu);
  m.impl("double_quantize", &double_quantize_cpu);
}

}  // namespace bnbx
