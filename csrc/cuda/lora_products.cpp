// CUDA lora_forward / lora_backward: the adapter's products as cuBLAS fp32 GEMMs on fp32 copies of the activations
// (a LoRA adapter's rank-r products are a few percent of a layer's work on a GPU). The results follow the schema in
// csrc/ops.cpp, fp32 products rounded once, as the CPU kernels (csrc/cpu/lora.cpp) compute them; a fused kernel
// that skips the fp32 copies is not written yet (README, limitations). Plain ATen, no kernel of its own: compiled
// in every build (no nvcc needed), so bnbx.lora runs on CUDA tensors even where bnbx's CUDA kernels were not built.
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include "../common/checks_lora.h"

namespace bnbx::cuda {
namespace {

// x [..., K] as fp32 [M, K] (and likewise for the other activations)
at::Tensor rows_fp32(const at::Tensor& t, int64_t M, int64_t width) { return t.reshape({M, width}).to(at::kFloat); }

at::Tensor lora_forward_cuda(const at::Tensor& x, const at::Tensor& base, const at::Tensor& lora_A,
                             const at::Tensor& lora_B, double scaling) {
  const LoraShape s = check_lora_args("lora_forward", x, base, "base", lora_A, lora_B, scaling);
  const c10::DeviceGuard guard(x.device());
  const at::Tensor hidden = at::mm(rows_fp32(x, s.M, s.K), lora_A.to(at::kFloat).t()).mul_(scaling);
  const at::Tensor sum = at::addmm(rows_fp32(base, s.M, s.N), hidden, lora_B.to(at::kFloat).t());
  return sum.to(base.scalar_type()).reshape(base.sizes()).contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                                                                  const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                                  double scaling, bool input_grad) {
  const LoraShape s = check_lora_args("lora_backward", x, grad_out, "grad_out", lora_A, lora_B, scaling);
  const c10::DeviceGuard guard(x.device());
  const at::Tensor input = rows_fp32(x, s.M, s.K), grad = rows_fp32(grad_out, s.M, s.N);
  const at::Tensor A = lora_A.to(at::kFloat), B = lora_B.to(at::kFloat);
  const at::Tensor hidden = at::mm(input, A.t()).mul_(scaling);
  const at::Tensor grad_hidden = at::mm(grad, B).mul_(scaling);
  at::Tensor grad_x = input_grad ? at::mm(grad_hidden, A).to(x.scalar_type()).reshape(x.sizes()).contiguous()
                                 : at::empty({0}, x.options());
  return {grad_x, at::mm(grad_hidden.t(), input).to(lora_A.scalar_type()),
          at::mm(grad.t(), hidden).to(lora_B.scalar_type())};
}

}  // namespace
}  // namespace bnbx::cuda

TORCH_LIBRARY_IMPL(bnbx, CUDA, m) {
  m.impl("lora_forward", &bnbx::cuda::lora_forward_cuda);
  m.impl("lora_backward", &bnbx::cuda::lora_backward_cuda);
}
