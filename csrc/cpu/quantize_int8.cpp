// CPU host code for int8 absmax / zero-point quantization over contiguous groups.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../common/checks.h"
#include "cpu_features.h"
#include "fresh_output.h"
#include "kernels/quantize_int8.h"

namespace bnbx {
namespace {

int64_t grain_in_groups(int64_t group_size) { return group_size >= 32768 ? 1 : 32768 / group_size; }

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_int8_cpu(const at::Tensor& A, int64_t group_size,
                                                                 bool symmetric) {
  check_quantize_int8_args(A, group_size);
  const at::Tensor input = A.contiguous();
  const int64_t n = input.numel();
  const int64_t groups = ceil_div(n, group_size);
  at::Tensor q = cpu::empty_output(input.sizes(), input.options().dtype(at::kChar));
  at::Tensor scale = at::empty({groups}, input.options().dtype(at::kFloat));
  at::Tensor zero_point = at::empty({groups}, input.options().dtype(at::kInt));

  const cpu::QuantizeInt8Kernels& kernels =
      cpu::select_kernels(cpu::quantize_int8_scalar, cpu::quantize_int8_avx2, cpu::quantize_int8_avx512);
  const FloatType in_type = to_float_type(input.scalar_type());
  const void* in = input.const_data_ptr();
  int8_t* q_ptr = q.mutable_data_ptr<int8_t>();
  float* scale_ptr = scale.mutable_data_ptr<float>();
  int32_t* zero_point_ptr = zero_point.mutable_data_ptr<int32_t>();
  at::parallel_for(0, groups, grain_in_groups(group_size), [&](int64_t begin, int64_t end) {
    kernels.quantize(in_type, in, n, group_size, symmetric, q_ptr, scale_ptr, zero_point_ptr, begin, end);
  });
  return {q, scale, zero_point};
}

at::Tensor dequantize_int8_cpu(const at::Tensor& A, const at::Tensor& scale, const at::Tensor& zero_point,
                               int64_t group_size, at::ScalarType dtype) {
  check_dequantize_int8_args(A, scale, zero_point, group_size, dtype);
  const at::Tensor q = A.contiguous();
  const at::Tensor scales = scale.contiguous();
  const at::Tensor zero_points = zero_point.contiguous();
  const int64_t n = q.numel();
  at::Tensor out = cpu::empty_output(q.sizes(), q.options().dtype(dtype));

  const cpu::QuantizeInt8Kernels& kernels =
      cpu::select_kernels(cpu::quantize_int8_scalar, cpu::quantize_int8_avx2, cpu::quantize_int8_avx512);
  const FloatType out_type = to_float_type(dtype);
  const int8_t* q_ptr = q.const_data_ptr<int8_t>();
  const float* scale_ptr = scales.const_data_ptr<float>();
  const int32_t* zero_point_ptr = zero_points.const_data_ptr<int32_t>();
  void* out_ptr = out.mutable_data_ptr();
  at::parallel_for(0, ceil_div(n, group_size), grain_in_groups(group_size), [&](int64_t begin, int64_t end) {
    kernels.dequantize(out_type, q_ptr, scale_ptr, zero_point_ptr, n, group_size, out_ptr, begin, end);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(bnbx, CPU, m) {
  m.impl("quantize_int8", &quantize_int8_cpu);
  m.impl("dequantize_int8", &dequantize_int8_cpu);
}

}  // namespace bnbx
