// CPU host code of LSQ / LSQ+ fake quantization (QAT with a learned scale and offset): the forward reads x
// once and writes the output once; the backward reads x and grad once, writes grad_x and reduces the scale's
// and offset's gradients per row (or per tensor) in the same pass. fp32/fp16/bf16 run the per-ISA kernels
// (kernels/fake_quant_lsq_impl.h) in fp32; fp64 runs a plain loop in double (for gradcheck).
// Determinism: a row's gradient sums are cut into fixed segments of kLsqSegment elements (from the shape
// alone), each summed over fixed lanes (rules.h), and the segments are added in order, so the bits do not
// depend on the thread count or on how at::parallel_for splits the work.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <vector>

#include "../common/checks_fake_quant.h"
#include "cpu_features.h"
#include "fresh_output.h"
#include "kernels/fake_quant_lsq.h"

namespace bnbx {
namespace {

constexpr const char* kForward = "fake_quantize_lsq";
constexpr const char* kBackward = "fake_quantize_lsq_backward";
constexpr int64_t kLsqSegment = 1 << 15;  // elements per partial sum; a multiple of kLsqLanes
static_assert(kLsqSegment % kLsqLanes == 0, "segments start on lane 0");

// One row's scale, reciprocal and offset in the compute type C.
template <typename C>
struct RowParams {
  std::vector<C> scale, inv_scale, offset;
  bool scale_per_row, offset_per_row;

  C s(int64_t row) const { return scale[scale_per_row ? row : 0]; }
  C inv(int64_t row) const { return inv_scale[scale_per_row ? row : 0]; }
  C o(int64_t row) const { return offset[offset_per_row ? row : 0]; }
};

template <typename C>
std::vector<C> host_values(const at::Tensor& t) {
  const at::Tensor converted = t.to(c10::CppTypeToScalarType<C>::value).contiguous();
  const C* data = converted.const_data_ptr<C>();
  return std::vector<C>(data, data + converted.numel());
}

// The scales and offsets in C, checked: a scale must be positive and finite (1 / scale is the step), an
// offset finite. Reading them here costs nothing next to a pass over x (one value per row at most).
template <typename C>
RowParams<C> row_params(const char* op, const LsqLayout& layout, const at::Tensor& scale, const at::Tensor& offset) {
  RowParams<C> p{host_values<C>(scale), {}, host_values<C>(offset), layout.scale_per_row, layout.offset_per_row};
  p.inv_scale.resize(p.scale.size());
  for (size_t i = 0; i < p.scale.size(); ++i) {
    const C s = p.scale[i];
    TORCH_CHECK_VALUE(s > C(0) && s <= std::numeric_limits<C>::max(), op, ": scale must be positive and finite, got ",
                      s, " at index ", i);
    p.inv_scale[i] = C(1) / s;
  }
  for (size_t i = 0; i < p.offset.size(); ++i) {
    TORCH_CHECK_VALUE(std::isfinite(p.offset[i]), op, ": offset must be finite, got ", p.offset[i], " at index ", i);
  }
  return p;
}

// Calls fn(row, begin, end) for every piece of a row inside [begin, end) of the flattened x.
template <typename Fn>
void for_row_pieces(int64_t begin, int64_t end, int64_t inner, const Fn& fn) {
  for (int64_t i = begin; i < end;) {
    const int64_t row = i / inner, stop = std::min(end, (row + 1) * inner);
    fn(row, i, stop);
    i = stop;
  }
}

at::Tensor fake_quantize_lsq_cpu(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& offset, double qmin,
                                 double qmax, double grad_scale) {
  const LsqLayout layout = check_fake_quantize_lsq_args(kForward, x, scale, offset, qmin, qmax);
  TORCH_CHECK_VALUE(std::isfinite(grad_scale), kForward, ": grad_scale must be finite, got ", grad_scale);
  const at::Tensor input = x.contiguous();
  at::Tensor out = cpu::empty_output(input.sizes(), input.options());
  const int64_t n = input.numel();
  if (n == 0) return out;
  const int64_t grain = 32768;
  if (input.scalar_type() == at::kDouble) {
    const RowParams<double> p = row_params<double>(kForward, layout, scale, offset);
    const double* in = input.const_data_ptr<double>();
    double* out_ptr = out.mutable_data_ptr<double>();
    at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
      for_row_pieces(begin, end, layout.inner, [&](int64_t row, int64_t start, int64_t stop) {
        for (int64_t i = start; i < stop; ++i) {
          out_ptr[i] = lsq_fake_quant(in[i], p.s(row), p.inv(row), p.o(row), qmin, qmax);
        }
      });
    });
    return out;
  }
  const RowParams<float> p = row_params<float>(kForward, layout, scale, offset);
  const cpu::FakeQuantLsqKernels& kernels =
      cpu::select_kernels(cpu::fake_quant_lsq_scalar, cpu::fake_quant_lsq_avx2, cpu::fake_quant_lsq_avx512);
  const FloatType type = to_float_type(input.scalar_type());
  const void* in = input.const_data_ptr();
  void* out_ptr = out.mutable_data_ptr();
  const bool stream = cpu::stream_output(out);
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for_row_pieces(begin, end, layout.inner, [&](int64_t row, int64_t start, int64_t stop) {
      const cpu::LsqParams params{p.s(row), p.inv(row), p.o(row), static_cast<float>(qmin), static_cast<float>(qmax)};
      kernels.forward(type, in, out_ptr, start, stop, params, stream);
    });
  });
  return out;
}

// The plain double loop of the backward over one segment (the kernels' lane order, rules.h).
void backward_double(const double* x, const double* grad, double* grad_x, int64_t begin, int64_t end, double inv,
                     double offset, double qmin, double qmax, double* scale_sum, double* offset_sum) {
  double scale_lanes[kLsqLanes] = {}, offset_lanes[kLsqLanes] = {};
  for (int64_t i = begin; i < end; ++i) {
    const LsqGrad<double> g = lsq_backward(x[i], grad[i], inv, offset, qmin, qmax);
    grad_x[i] = g.grad_x;
    scale_lanes[(i - begin) % kLsqLanes] += g.d_scale;
    offset_lanes[(i - begin) % kLsqLanes] += g.d_offset;
  }
  double s = 0.0, o = 0.0;
  for (int lane = 0; lane < kLsqLanes; ++lane) {
    s += scale_lanes[lane];
    o += offset_lanes[lane];
  }
  *scale_sum = s;
  *offset_sum = o;
}

// Sums of the segment partials per row (per_row) or over all of them in order (per tensor), times factor,
// as a tensor shaped and typed like `like`.
at::Tensor reduce_partials(const std::vector<double>& partials, int64_t rows, int64_t per_row, bool is_per_row,
                           double factor, const at::Tensor& like) {
  const int64_t groups = is_per_row ? rows : 1;
  at::Tensor result = at::empty({groups}, like.options().dtype(at::kDouble).device(at::kCPU));
  double* data = result.mutable_data_ptr<double>();
  const int64_t span = is_per_row ? per_row : rows * per_row;
  for (int64_t group = 0; group < groups; ++group) {
    double sum = 0.0;
    for (int64_t k = group * span; k < (group + 1) * span; ++k) sum += partials[k];
    data[group] = sum * factor;
  }
  return result.to(like.scalar_type()).view(like.sizes());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quantize_lsq_backward_cpu(const at::Tensor& grad,
                                                                              const at::Tensor& x,
                                                                              const at::Tensor& scale,
                                                                              const at::Tensor& offset, double qmin,
                                                                              double qmax, double grad_scale) {
  const LsqLayout layout = check_fake_quantize_lsq_args(kBackward, x, scale, offset, qmin, qmax);
  check_fake_quantize_lsq_grad(kBackward, grad, x);
  TORCH_CHECK_VALUE(std::isfinite(grad_scale), kBackward, ": grad_scale must be finite, got ", grad_scale);
  const at::Tensor input = x.contiguous(), g = grad.contiguous();
  at::Tensor grad_x = cpu::empty_output(input.sizes(), input.options());
  if (input.numel() == 0) return {grad_x, at::zeros_like(scale), at::zeros_like(offset)};

  const int64_t rows = layout.rows, inner = layout.inner;
  const int64_t per_row = ceil_div(inner, kLsqSegment);
  const int64_t units = rows * per_row;
  std::vector<double> scale_partials(units), offset_partials(units);
  const int64_t grain = std::max<int64_t>(1, 32768 / std::min(inner, kLsqSegment));
  auto unit_bounds = [&](int64_t unit) {
    const int64_t row = unit / per_row, row_end = (row + 1) * inner;
    const int64_t begin = row * inner + (unit % per_row) * kLsqSegment;
    return std::tuple<int64_t, int64_t, int64_t>(row, begin, std::min(row_end, begin + kLsqSegment));
  };
  if (input.scalar_type() == at::kDouble) {
    const RowParams<double> p = row_params<double>(kBackward, layout, scale, offset);
    const double* x_ptr = input.const_data_ptr<double>();
    const double* g_ptr = g.const_data_ptr<double>();
    double* gx_ptr = grad_x.mutable_data_ptr<double>();
    at::parallel_for(0, units, grain, [&](int64_t first, int64_t last) {
      for (int64_t unit = first; unit < last; ++unit) {
        const auto [row, begin, end] = unit_bounds(unit);
        backward_double(x_ptr, g_ptr, gx_ptr, begin, end, p.inv(row), p.o(row), qmin, qmax, &scale_partials[unit],
                        &offset_partials[unit]);
      }
    });
  } else {
    const RowParams<float> p = row_params<float>(kBackward, layout, scale, offset);
    const cpu::FakeQuantLsqKernels& kernels =
        cpu::select_kernels(cpu::fake_quant_lsq_scalar, cpu::fake_quant_lsq_avx2, cpu::fake_quant_lsq_avx512);
    const FloatType type = to_float_type(input.scalar_type());
    const void* x_ptr = input.const_data_ptr();
    const void* g_ptr = g.const_data_ptr();
    void* gx_ptr = grad_x.mutable_data_ptr();
    const bool stream = cpu::stream_output(grad_x);
    at::parallel_for(0, units, grain, [&](int64_t first, int64_t last) {
      for (int64_t unit = first; unit < last; ++unit) {
        const auto [row, begin, end] = unit_bounds(unit);
        const cpu::LsqParams params{p.s(row), p.inv(row), p.o(row), static_cast<float>(qmin), static_cast<float>(qmax)};
        kernels.backward(type, x_ptr, g_ptr, gx_ptr, begin, end, params, stream, &scale_partials[unit],
                         &offset_partials[unit]);
      }
    });
  }
  return {grad_x, reduce_partials(scale_partials, rows, per_row, layout.scale_per_row, grad_scale, scale),
          reduce_partials(offset_partials, rows, per_row, layout.offset_per_row, 1.0, offset)};
}

}  // namespace

TORCH_LIBRARY_IMPL(bnbx, CPU, m) {
  m.impl("fake_quantize_lsq", &fake_quantize_lsq_cpu);
  m.impl("fake_quantize_lsq_backward", &fake_quantize_lsq_backward_cpu);
}

}  // namespace bnbx
