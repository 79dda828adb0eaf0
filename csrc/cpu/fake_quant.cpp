// CPU host code of integer fake quantization (QAT) over contiguous groups: dynamic MinMax statistics and the
// quantize-dequantize fused per group, so a group is read from memory once (its second read hits the cache)
// and written once. Groups too large for a cache and too few to keep every thread busy (per-tensor scales)
// are split into segments: the ranges of the segments, one reduction per group, then the values.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <vector>

#include "../common/checks_fake_quant.h"
#include "cpu_features.h"
#include "fresh_output.h"
#include "kernels/fake_quant.h"

namespace bnbx {
namespace {

constexpr int64_t kSegment = 1 << 16;  // elements per task of a split group (256 KiB of fp32)

std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quantize_cpu(const at::Tensor& x, int64_t group_size, int64_t bits,
                                                                 bool symmetric, bool full_range, c10::string_view mask,
                                                                 double clip) {
  check_fake_quantize_args(x, group_size, bits, mask, clip);
  const at::Tensor input = x.contiguous();
  const int64_t n = input.numel();
  const int64_t groups = ceil_div(n, group_size);
  at::Tensor out = cpu::empty_output(input.sizes(), input.options());
  at::Tensor scale = at::empty({groups}, input.options().dtype(at::kFloat));
  at::Tensor zero_point = at::empty({groups}, input.options().dtype(at::kInt));
  if (n == 0) return {out, scale, zero_point};

  const cpu::FakeQuantKernels& kernels =
      cpu::select_kernels(cpu::fake_quant_scalar, cpu::fake_quant_avx2, cpu::fake_quant_avx512);
  const FakeQuantGrid grid = fake_quant_grid(bits, symmetric, full_range);
  const FloatType type = to_float_type(input.scalar_type());
  const void* in = input.const_data_ptr();
  void* out_ptr = out.mutable_data_ptr();
  float* scale_ptr = scale.mutable_data_ptr<float>();
  int32_t* zero_point_ptr = zero_point.mutable_data_ptr<int32_t>();
  const bool stream = cpu::stream_output(out);
  auto store = [&](int64_t group, const AffineParams& params) {
    scale_ptr[group] = params.scale;
    zero_point_ptr[group] = static_cast<int32_t>(params.zero_point);
  };

  if (group_size <= kSegment || groups >= 4 * at::get_num_threads()) {
    at::parallel_for(0, groups, std::max<int64_t>(1, 32768 / group_size), [&](int64_t begin, int64_t end) {
      for (int64_t group = begin; group < end; ++group) {
        const int64_t start = group * group_size, stop = std::min(n, start + group_size);
        float low = 0.0f, high = 0.0f;
        bool nonfinite = false;
        kernels.range(type, in, start, stop, &low, &high, &nonfinite);
        const AffineParams params =
            affine_params(low, high, nonfinite, symmetric, grid.qmin, grid.qmax, grid.sym_denominator);
        store(group, params);
        kernels.apply(type, in, out_ptr, start, stop, params, grid.qmin, grid.qmax, stream);
      }
    });
    return {out, scale, zero_point};
  }

  // split groups: segment k of group g is [g * group_size + k * kSegment, ...) clipped to the group
  const int64_t per_group = ceil_div(std::min(group_size, n), kSegment);
  const int64_t segments = groups * per_group;
  std::vector<float> lows(segments, 0.0f), highs(segments, 0.0f);
  std::vector<char> bad(segments, 0);
  auto bounds = [&](int64_t segment) {
    const int64_t group = segment / per_group;
    const int64_t group_end = std::min(n, (group + 1) * group_size);
    const int64_t start = std::min(group_end, group * group_size + (segment % per_group) * kSegment);
    return std::pair<int64_t, int64_t>(start, std::min(group_end, start + kSegment));
  };
  at::parallel_for(0, segments, 1, [&](int64_t begin, int64_t end) {
    for (int64_t segment = begin; segment < end; ++segment) {
      const auto [start, stop] = bounds(segment);
      bool nonfinite = false;
      kernels.range(type, in, start, stop, &lows[segment], &highs[segment], &nonfinite);
      bad[segment] = nonfinite;
    }
  });
  // the range fold is order-free (see fake_quant_impl.h), so combining segments gives the one-pass result
  std::vector<AffineParams> params(groups);
  for (int64_t group = 0; group < groups; ++group) {
    float low = 0.0f, high = 0.0f;
    bool nonfinite = false;
    for (int64_t k = group * per_group; k < (group + 1) * per_group; ++k) {
      low = lows[k] < low ? lows[k] : low;
      high = highs[k] > high ? highs[k] : high;
      nonfinite |= bad[k] != 0;
    }
    params[group] = affine_params(low, high, nonfinite, symmetric, grid.qmin, grid.qmax, grid.sym_denominator);
    store(group, params[group]);
  }
  at::parallel_for(0, segments, 1, [&](int64_t begin, int64_t end) {
    for (int64_t segment = begin; segment < end; ++segment) {
      const auto [start, stop] = bounds(segment);
      kernels.apply(type, in, out_ptr, start, stop, params[segment / per_group], grid.qmin, grid.qmax, stream);
    }
  });
  return {out, scale, zero_point};
}

}  // namespace

TORCH_LIBRARY_IMPL(bnbx, CPU, m) { m.impl("fake_quantize", &fake_quantize_cpu); }

}  // namespace bnbx
