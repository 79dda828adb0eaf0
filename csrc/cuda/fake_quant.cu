// CUDA integer fake quantization (QAT) over contiguous groups: host code, then the kernels. Same results as
// the CPU (csrc/cpu/fake_quant.cpp): the rule is bnbx::affine_params / affine_fake_quant of common/rules.h,
// and the range fold "x < low ? x : low" is order-free (see cpu/kernels/fake_quant_impl.h), so any reduction
// tree gives the CPU's range. Compiled and checked for compilation here; no GPU test has run it yet.
//   whole groups: one thread block per group (grid-stride over groups) reduces the range, derives the
//     parameters and writes the values; the second read of the group mostly hits L1/L2.
//   split groups (few huge groups, e.g. per tensor): the range of every segment, one parameter kernel per
//     group, then the values of every segment (three kernels).
#include <torch/library.h>

#include "../common/checks_fake_quant.h"
#include "../common/rules.h"
#include "cuda_host.h"

namespace bnbx::cuda {
namespace {

constexpr int kFqThreads = 256;
constexpr int64_t kFqSegment = 1 << 16;

struct FqRange {
  float low, high;
  int bad;
};

__device__ __forceinline__ FqRange fq_combine(FqRange a, FqRange b) {
  return {b.low < a.low ? b.low : a.low, b.high > a.high ? b.high : a.high, a.bad | b.bad};
}

// Range over in[begin, end) by the whole block; every thread gets the result.
template <typename T>
__device__ FqRange fq_block_range(const T* in, int64_t begin, int64_t end) {
  FqRange r{0.0f, 0.0f, 0};
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const float x = to_float(in[i]);
    r.bad |= !(fabsf(x) <= FLT_MAX);
    r.low = x < r.low ? x : r.low;
    r.high = x > r.high ? x : r.high;
  }
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const FqRange other{__shfl_xor_sync(0xffffffffu, r.low, offset), __shfl_xor_sync(0xffffffffu, r.high, offset),
                        __shfl_xor_sync(0xffffffffu, r.bad, offset)};
    r = fq_combine(r, other);
  }
  __shared__ FqRange warps[kFqThreads / kWarpSize];
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  __syncthreads();  // `warps` may still be read by the previous group's threads
  if (lane == 0) warps[warp] = r;
  __syncthreads();
  FqRange total{0.0f, 0.0f, 0};
  for (int w = 0; w < static_cast<int>(blockDim.x / kWarpSize); ++w) total = fq_combine(total, warps[w]);
  return total;
}

template <typename T>
__device__ __forceinline__ void fq_apply(const T* in, T* out, int64_t begin, int64_t end, const AffineParams& p,
                                         float qmin, float qmax, float limit) {
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const float value = affine_fake_quant(to_float(in[i]), p, qmin, qmax);
    out[i] = from_float<T>(std_max(std_min(value, limit), -limit));
  }
}

template <typename T>
__global__ void fake_quant_groups_kernel(const T* in, T* out, int64_t n, int64_t group_size, int64_t groups,
                                         bool symmetric, FakeQuantGrid grid, float limit, float* scale,
                                         int32_t* zero_point) {
  for (int64_t group = blockIdx.x; group < groups; group += gridDim.x) {
    const int64_t start = group * group_size, stop = min(n, start + group_size);
    const FqRange r = fq_block_range(in, start, stop);
    const AffineParams p =
        affine_params(r.low, r.high, r.bad != 0, symmetric, grid.qmin, grid.qmax, grid.sym_denominator);
    if (threadIdx.x == 0) {
      scale[group] = p.scale;
      zero_point[group] = static_cast<int32_t>(p.zero_point);
    }
    fq_apply(in, out, start, stop, p, grid.qmin, grid.qmax, limit);
  }
}

__device__ __forceinline__ void fq_segment_bounds(int64_t segment, int64_t per_group, int64_t n, int64_t group_size,
                                                  int64_t* start, int64_t* stop) {
  const int64_t group = segment / per_group;
  const int64_t group_end = min(n, (group + 1) * group_size);
  *start = min(group_end, group * group_size + (segment % per_group) * kFqSegment);
  *stop = min(group_end, *start + kFqSegment);
}

template <typename T>
__global__ void fake_quant_segment_range_kernel(const T* in, int64_t n, int64_t group_size, int64_t per_group,
                                                int64_t segments, FqRange* ranges) {
  for (int64_t segment = blockIdx.x; segment < segments; segment += gridDim.x) {
    int64_t start, stop;
    fq_segment_bounds(segment, per_group, n, group_size, &start, &stop);
    const FqRange r = fq_block_range(in, start, stop);
    if (threadIdx.x == 0) ranges[segment] = r;
  }
}

__global__ void fake_quant_params_kernel(const FqRange* ranges, int64_t per_group, int64_t groups, bool symmetric,
                                         FakeQuantGrid grid, float* scale, int32_t* zero_point) {
  for (int64_t group = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; group < groups;
       group += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    FqRange r{0.0f, 0.0f, 0};
    for (int64_t k = group * per_group; k < (group + 1) * per_group; ++k) r = fq_combine(r, ranges[k]);
    const AffineParams p =
        affine_params(r.low, r.high, r.bad != 0, symmetric, grid.qmin, grid.qmax, grid.sym_denominator);
    scale[group] = p.scale;
    zero_point[group] = static_cast<int32_t>(p.zero_point);
  }
}

// The parameters rebuilt from what the parameter kernel stored (a NaN scale marks a non-finite group).
__device__ __forceinline__ AffineParams fq_stored_params(float scale, int32_t zero_point) {
  const bool nonfinite = scale != scale;
  return {scale, nonfinite || scale == 0.0f ? 0.0f : 1.0f / scale, static_cast<float>(zero_point), nonfinite};
}

template <typename T>
__global__ void fake_quant_segment_apply_kernel(const T* in, T* out, int64_t n, int64_t group_size, int64_t per_group,
                                                int64_t segments, FakeQuantGrid grid, float limit, const float* scale,
                                                const int32_t* zero_point) {
  for (int64_t segment = blockIdx.x; segment < segments; segment += gridDim.x) {
    int64_t start, stop;
    fq_segment_bounds(segment, per_group, n, group_size, &start, &stop);
    const int64_t group = segment / per_group;
    fq_apply(in, out, start, stop, fq_stored_params(scale[group], zero_point[group]), grid.qmin, grid.qmax, limit);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quantize_cuda(const at::Tensor& x, int64_t group_size, int64_t bits,
                                                                  bool symmetric, bool full_range,
                                                                  c10::string_view mask, double clip) {
  check_fake_quantize_args(x, group_size, bits, mask, clip);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor input = x.contiguous();
  const int64_t n = input.numel();
  const int64_t groups = ceil_div(n, group_size);
  at::Tensor out = at::empty(input.sizes(), input.options());
  at::Tensor scale = at::empty({groups}, input.options().dtype(at::kFloat));
  at::Tensor zero_point = at::empty({groups}, input.options().dtype(at::kInt));
  if (n == 0) return {out, scale, zero_point};

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const FakeQuantGrid grid = fake_quant_grid(bits, symmetric, full_range);
  const float limit = input.scalar_type() == at::kHalf ? 65504.0f : FLT_MAX;
  const bool split = group_size > kFqSegment && groups < resident_blocks(fake_quant_groups_kernel<float>,
                                                                         kFqThreads);  // fp32 occupancy as the guide
  dispatch_float(input.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* in = static_cast<const T*>(input.const_data_ptr());
    T* out_ptr = static_cast<T*>(out.mutable_data_ptr());
    if (!split) {
      fake_quant_groups_kernel<T>
          <<<grid_size(fake_quant_groups_kernel<T>, groups, kFqThreads), kFqThreads, 0, stream>>>(
              in, out_ptr, n, group_size, groups, symmetric, grid, limit, scale.mutable_data_ptr<float>(),
              zero_point.mutable_data_ptr<int32_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    const int64_t per_group = ceil_div(std::min(group_size, n), kFqSegment);
    const int64_t segments = groups * per_group;
    static_assert(sizeof(FqRange) == 3 * sizeof(float), "ranges are stored as three 4-byte words");
    at::Tensor ranges = at::empty({segments, 3}, input.options().dtype(at::kFloat));
    FqRange* ranges_ptr = reinterpret_cast<FqRange*>(ranges.mutable_data_ptr<float>());
    fake_quant_segment_range_kernel<T>
        <<<grid_size(fake_quant_segment_range_kernel<T>, segments, kFqThreads), kFqThreads, 0, stream>>>(
            in, n, group_size, per_group, segments, ranges_ptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    fake_quant_params_kernel<<<grid_size(fake_quant_params_kernel, ceil_div(groups, kFqThreads), kFqThreads),
                               kFqThreads, 0, stream>>>(ranges_ptr, per_group, groups, symmetric, grid,
                                                        scale.mutable_data_ptr<float>(),
                                                        zero_point.mutable_data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    fake_quant_segment_apply_kernel<T>
        <<<grid_size(fake_quant_segment_apply_kernel<T>, segments, kFqThreads), kFqThreads, 0, stream>>>(
            in, out_ptr, n, group_size, per_group, segments, grid, limit, scale.const_data_ptr<float>(),
            zero_point.const_data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, scale, zero_point};
}

}  // namespace

TORCH_LIBRARY_IMPL(bnbx, CUDA, m) { m.impl("fake_quantize", &fake_quantize_cuda); }

}  // namespace bnbx::cuda
