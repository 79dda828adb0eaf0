// CPU host code of the lora family: a LoRA adapter's forward (its output added to the base layer's) and backward,
// each one fused pass per product over the activations in their own dtype (kernels/lora_impl.h), instead of a
// cast, a skinny GEMM and an add per product. Threads over rows for the per-row products, over columns for the
// two weight gradients (sums over every row, in row order, so the results do not depend on the thread count).
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>

#include "../common/checks_lora.h"
#include "cpu_features.h"
#include "fresh_output.h"
#include "kernels/lora.h"

namespace bnbx {
namespace {

const cpu::LoraKernels& kernels() { return cpu::select_kernels(cpu::lora_scalar, cpu::lora_avx2, cpu::lora_avx512); }

// Rows per task of the per-row products: enough FMAs (about 2^16) that a task outweighs its scheduling.
int64_t row_grain(const LoraShape& s) { return std::max<int64_t>(1, 65536 / std::max<int64_t>(1, (s.K + s.N) * s.r)); }

// fp32 [cols, rows] from a matrix [rows, cols] (the adapter's weights and their gradients: a few MiB at most), in
// tiles of 64 x 64 so that neither side strides across more than a few pages at a time. (at::Tensor::contiguous()
// of a transposed skinny matrix takes several times longer.)
at::Tensor transposed_fp32(const at::Tensor& matrix) {
  constexpr int64_t kTile = 64;
  const at::Tensor source = matrix.to(at::kFloat).contiguous();
  const int64_t rows = source.size(0), cols = source.size(1);
  at::Tensor out = at::empty({cols, rows}, source.options());
  const float* from = source.const_data_ptr<float>();
  float* to = out.mutable_data_ptr<float>();
  for (int64_t i0 = 0; i0 < rows; i0 += kTile) {
    for (int64_t j0 = 0; j0 < cols; j0 += kTile) {
      const int64_t i1 = std::min(rows, i0 + kTile), j1 = std::min(cols, j0 + kTile);
      for (int64_t j = j0; j < j1; ++j)
        for (int64_t i = i0; i < i1; ++i) to[j * rows + i] = from[i * cols + j];
    }
  }
  return out;
}

// An adapter weight as stored, in fp32: lora_A [r, K] always, lora_B [N, r] for a few rows.
at::Tensor fp32_as_stored(const at::Tensor& weight) { return weight.to(at::kFloat).contiguous(); }

// Up to this many rows, lora_B is multiplied as stored (expand_rows, accumulate_rows) instead of transposed to
// [r, N] first (which a single token pays more for than for its products). The two sum in different orders, so a
// row's last bits may change with the number of rows. Forward, K=4096, N=11008, r=16, bf16, on the 2-core Xeon
// (ms, as stored / transposed): M=1 0.036 / 0.159, M=16 0.27 / 0.23, M=32 0.27 / 0.30, M=64 0.50 / 0.42.
constexpr int64_t kFewRows = 16;

at::Tensor lora_forward_cpu(const at::Tensor& x, const at::Tensor& base, const at::Tensor& lora_A,
                            const at::Tensor& lora_B, double scaling) {
  const LoraShape s = check_lora_args("lora_forward", x, base, "base", lora_A, lora_B, scaling);
  at::Tensor out = cpu::empty_output(base.sizes(), base.options());
  if (out.numel() == 0) return out;
  const at::Tensor input = x.contiguous(), added = base.contiguous();
  const bool few_rows = s.M <= kFewRows;
  const at::Tensor A = fp32_as_stored(lora_A), B = few_rows ? fp32_as_stored(lora_B) : transposed_fp32(lora_B);
  at::Tensor hidden = at::empty({s.M, s.r}, x.options().dtype(at::kFloat));
  const cpu::LoraKernels& k = kernels();
  const FloatType x_type = to_float_type(input.scalar_type()), out_type = to_float_type(out.scalar_type());
  float* h = hidden.mutable_data_ptr<float>();
  at::parallel_for(0, s.M, row_grain(s), [&](int64_t begin, int64_t end) {
    k.dot(x_type, input.const_data_ptr(), s.K, A.const_data_ptr<float>(), s.r, static_cast<float>(scaling), h, begin,
          end);
    (few_rows ? k.expand_rows : k.expand)(h, s.r, B.const_data_ptr<float>(), s.N, out_type, added.const_data_ptr(),
                                          out.mutable_data_ptr(), begin, end);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                                                 const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                                 double scaling, bool input_grad) {
  const LoraShape s = check_lora_args("lora_backward", x, grad_out, "grad_out", lora_A, lora_B, scaling);
  const at::Tensor input = x.contiguous(), grad = grad_out.contiguous();
  // a few rows: lora_B and its gradient in their own layout [N, r] (accumulate_rows); more: transposed, [r, N]
  const bool few_rows = s.M <= kFewRows;
  const at::Tensor A = fp32_as_stored(lora_A), B = few_rows ? fp32_as_stored(lora_B) : transposed_fp32(lora_B);
  const at::TensorOptions fp32 = x.options().dtype(at::kFloat);
  at::Tensor hidden = at::empty({s.M, s.r}, fp32), grad_hidden = at::empty({s.M, s.r}, fp32);
  at::Tensor grad_A = at::empty({s.r, s.K}, fp32);
  at::Tensor grad_B = few_rows ? at::empty({s.N, s.r}, fp32) : at::empty({s.r, s.N}, fp32);
  at::Tensor grad_x = input_grad ? cpu::empty_output(x.sizes(), x.options()) : at::empty({0}, x.options());
  const cpu::LoraKernels& k = kernels();
  const FloatType x_type = to_float_type(input.scalar_type()), grad_type = to_float_type(grad.scalar_type());
  const float scale = static_cast<float>(scaling);
  float* h = hidden.mutable_data_ptr<float>();
  float* gh = grad_hidden.mutable_data_ptr<float>();
  // the hidden activation again (cheaper than keeping it), and scaling * grad_out @ B, the gradient of x @ A^T
  at::parallel_for(0, s.M, row_grain(s), [&](int64_t begin, int64_t end) {
    k.dot(x_type, input.const_data_ptr(), s.K, A.const_data_ptr<float>(), s.r, scale, h, begin, end);
    if (few_rows) {
      k.accumulate_rows(grad_type, grad.const_data_ptr(), s.N, 1, s.N, B.const_data_ptr<float>(), s.r, scale, gh, begin,
                        end);
    } else {
      k.dot(grad_type, grad.const_data_ptr(), s.N, B.const_data_ptr<float>(), s.r, scale, gh, begin, end);
    }
  });
  // grad_B = grad_out^T @ hidden over chunks of N (transposed: [r, N], but for a few rows), then grad_A =
  // grad_hidden^T @ x over chunks of K's columns
  const int64_t chunk = cpu::kLoraColumnChunk, n_chunks = ceil_div(s.N, chunk), k_chunks = ceil_div(s.K, chunk);
  at::parallel_for(0, n_chunks + k_chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      if (c < n_chunks) {
        const int64_t n0 = c * chunk, n1 = std::min(s.N, n0 + chunk);
        if (few_rows) {
          k.accumulate_rows(grad_type, grad.const_data_ptr(), 1, s.N, s.M, h, s.r, 1.0f,
                            grad_B.mutable_data_ptr<float>(), n0, n1);
        } else {
          k.outer(h, s.M, s.r, grad_type, grad.const_data_ptr(), s.N, grad_B.mutable_data_ptr<float>(), n0, n1);
        }
      } else {
        const int64_t k0 = (c - n_chunks) * chunk;
        k.outer(gh, s.M, s.r, x_type, input.const_data_ptr(), s.K, grad_A.mutable_data_ptr<float>(), k0,
                std::min(s.K, k0 + chunk));
      }
    }
  });
  if (input_grad && grad_x.numel() > 0) {
    at::parallel_for(0, s.M, row_grain(s), [&](int64_t begin, int64_t end) {
      k.expand(gh, s.r, A.const_data_ptr<float>(), s.K, x_type, nullptr, grad_x.mutable_data_ptr(), begin, end);
    });
  }
  if (!few_rows) grad_B = transposed_fp32(grad_B);
  return {grad_x, grad_A.to(lora_A.scalar_type()), grad_B.to(lora_B.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(bnbx, CPU, m) {
  m.impl("lora_forward", &lora_forward_cpu);
  m.impl("lora_backward", &lora_backward_cpu);
}

}  // namespace bnbx
