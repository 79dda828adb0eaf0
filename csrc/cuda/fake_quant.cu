// CUDA integer fake quantization (QAT) over contiguous groups: kernels, launchers, host code. Same results as
// the CPU (csrc/cpu/fake_quant.cpp): the rule is bnbx::affine_params / affine_fake_quant of common/rules.h,
// and the range fold "x < low ? x : low" is order-free (see cpu/kernels/fake_quant_impl.h), so any reduction
// tree gives the CPU's range. Checked bit for bit against the CPU in the host emulation (no GPU run yet).
//   whole groups: one thread block per group (grid-stride over groups) reduces the range, derives the
//     parameters and writes the values; the second read of the group mostly hits L1/L2.
//   split groups (few huge groups, e.g. per tensor): the range of every segment, one parameter kernel per
//     group, then the values of every segment (three kernels).
// The kernels and their torch-free launchers (LSQ / LSQ+ with given scales and offsets, then MinMax) come first;
// csrc/cuda/emulation/emu_fake_quant.cpp runs them on the CPU in the tests. All torch host code follows.
#include <limits>
#include <type_traits>

#include "../common/rules.h"
#include "cuda_utils.cuh"

namespace bnbx::cuda {
namespace {

// --- LSQ / LSQ+ (fake_quantize_lsq, fake_quantize_lsq_backward): kernels and launchers ------------------------
// The rules are bnbx::lsq_fake_quant / lsq_backward of common/rules.h, in fp32 (double for fp64 x), so the values
// and grad_x equal the CPU's. x is `rows` rows of `inner` elements, cut into tiles of kLsqTile elements inside a
// row; a thread block works on one tile at a time (grid-stride). The backward sums each tile in double with a
// fixed tree (thread-strided partial sums, then warp shuffles, then the warps in order) and a second kernel adds
// a group's tiles with the same tree: deterministic, but in another order than the CPU (last bits may differ).
// Scales are not checked on the device (a check would synchronize every call): a scale that is not positive
// and finite makes its rows NaN, and its gradient NaN.

constexpr int kLsqThreads = 256;
constexpr int64_t kLsqTile = 4096;

template <typename T>
struct LsqMath {
  using type = float;
};
template <>
struct LsqMath<double> {
  using type = double;
};
template <typename T>
using LsqC = typename LsqMath<T>::type;

template <typename T>
__device__ __forceinline__ LsqC<T> lsq_load(T v) {
  return to_float(v);
}
template <>
__device__ __forceinline__ double lsq_load<double>(double v) {
  return v;
}
template <typename T>
__device__ __forceinline__ T lsq_store(LsqC<T> v) {
  return from_float<T>(v);
}
template <>
__device__ __forceinline__ double lsq_store<double>(double v) {
  return v;
}

// x as rows of `inner` elements; scale and offset hold one value, or one per row.
struct LsqShape {
  int64_t rows, inner, tiles_per_row;
  bool scale_per_row, offset_per_row;
};

inline LsqShape lsq_shape(int64_t rows, int64_t inner, bool scale_per_row, bool offset_per_row) {
  return {rows, inner, inner == 0 ? 0 : ceil_div(inner, kLsqTile), scale_per_row, offset_per_row};
}

// A row's scale (NaN when it is not positive and finite), its reciprocal and its offset.
template <typename C>
struct LsqRow {
  C scale, inv, offset;
};

template <typename C>
__device__ __forceinline__ LsqRow<C> lsq_row(const C* scale, const C* offset, int64_t row, const LsqShape& shape) {
  C s = scale[shape.scale_per_row ? row : 0];
  if (!(s > C(0) && s <= std::numeric_limits<C>::max())) s = std::numeric_limits<C>::quiet_NaN();
  return {s, C(1) / s, offset[shape.offset_per_row ? row : 0]};
}

// The elements [begin, end) of tile `tile`.
__device__ __forceinline__ void lsq_tile_bounds(const LsqShape& shape, int64_t tile, int64_t* row, int64_t* begin,
                                                int64_t* end) {
  *row = tile / shape.tiles_per_row;
  *begin = *row * shape.inner + (tile % shape.tiles_per_row) * kLsqTile;
  const int64_t row_end = (*row + 1) * shape.inner;
  *end = row_end < *begin + kLsqTile ? row_end : *begin + kLsqTile;
}

template <typename T>
__global__ void fake_quantize_lsq_kernel(const T* in, T* out, LsqShape shape, const LsqC<T>* scale,
                                         const LsqC<T>* offset, LsqC<T> qmin, LsqC<T> qmax) {
  for (int64_t tile = blockIdx.x; tile < shape.rows * shape.tiles_per_row; tile += gridDim.x) {
    int64_t row, begin, end;
    lsq_tile_bounds(shape, tile, &row, &begin, &end);
    const LsqRow<LsqC<T>> p = lsq_row(scale, offset, row, shape);
    for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
      out[i] = lsq_store<T>(lsq_fake_quant(lsq_load(in[i]), p.scale, p.inv, p.offset, qmin, qmax));
    }
  }
}

// The sums of two doubles over the block, in a fixed order; thread 0 gets the result.
__device__ __forceinline__ void lsq_block_sum(double* a, double* b) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    *a += __shfl_xor_sync(0xffffffffu, *a, offset);
    *b += __shfl_xor_sync(0xffffffffu, *b, offset);
  }
  __shared__ double warps[2][kLsqThreads / kWarpSize];
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  __syncthreads();  // `warps` may still be read for the previous tile
  if (lane == 0) {
    warps[0][warp] = *a;
    warps[1][warp] = *b;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    double sa = 0.0, sb = 0.0;
    for (int w = 0; w < static_cast<int>(blockDim.x / kWarpSize); ++w) {
      sa += warps[0][w];
      sb += warps[1][w];
    }
    *a = sa;
    *b = sb;
  }
}

template <typename T>
__global__ void fake_quantize_lsq_backward_kernel(const T* grad, const T* x, T* grad_x, LsqShape shape,
                                                  const LsqC<T>* scale, const LsqC<T>* offset, LsqC<T> qmin,
                                                  LsqC<T> qmax, double* scale_partials, double* offset_partials) {
  for (int64_t tile = blockIdx.x; tile < shape.rows * shape.tiles_per_row; tile += gridDim.x) {
    int64_t row, begin, end;
    lsq_tile_bounds(shape, tile, &row, &begin, &end);
    const LsqRow<LsqC<T>> p = lsq_row(scale, offset, row, shape);
    double scale_sum = 0.0, offset_sum = 0.0;
    for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
      const LsqGrad<LsqC<T>> g = lsq_backward(lsq_load(x[i]), lsq_load(grad[i]), p.inv, p.offset, qmin, qmax);
      grad_x[i] = lsq_store<T>(g.grad_x);
      scale_sum += static_cast<double>(g.d_scale);
      offset_sum += static_cast<double>(g.d_offset);
    }
    lsq_block_sum(&scale_sum, &offset_sum);
    if (threadIdx.x == 0) {
      scale_partials[tile] = scale_sum;
      offset_partials[tile] = offset_sum;
    }
  }
}

// out[group] = factor * the sum of partials[group * span, (group + 1) * span), one block per group.
__global__ void lsq_reduce_partials_kernel(const double* partials, int64_t groups, int64_t span, double factor,
                                           double* out) {
  for (int64_t group = blockIdx.x; group < groups; group += gridDim.x) {
    double sum = 0.0, unused = 0.0;
    for (int64_t k = group * span + threadIdx.x; k < (group + 1) * span; k += blockDim.x) sum += partials[k];
    lsq_block_sum(&sum, &unused);
    if (threadIdx.x == 0) out[group] = sum * factor;
  }
}

template <typename T>
void launch_fake_quantize_lsq(const T* in, T* out, const LsqShape& shape, const LsqC<T>* scale, const LsqC<T>* offset,
                              LsqC<T> qmin, LsqC<T> qmax, cudaStream_t stream) {
  const int64_t tiles = shape.rows * shape.tiles_per_row;
  if (tiles == 0) return;
  auto kernel = fake_quantize_lsq_kernel<T>;
  launch_kernel(kernel, grid_size(kernel, tiles, kLsqThreads), kLsqThreads, stream, in, out, shape, scale, offset, qmin,
                qmax);
}

// Doubles of workspace the backward launcher needs: two partial sums per tile.
inline int64_t lsq_backward_workspace(const LsqShape& shape) { return 2 * shape.rows * shape.tiles_per_row; }

// grad_x, and the scale's (times grad_scale) and offset's gradients in double: one value, or one per row.
template <typename T>
void launch_fake_quantize_lsq_backward(const T* grad, const T* x, T* grad_x, const LsqShape& shape,
                                       const LsqC<T>* scale, const LsqC<T>* offset, LsqC<T> qmin, LsqC<T> qmax,
                                       double grad_scale, double* workspace, double* scale_grad, double* offset_grad,
                                       cudaStream_t stream) {
  const int64_t tiles = shape.rows * shape.tiles_per_row;
  if (tiles == 0) return;
  auto kernel = fake_quantize_lsq_backward_kernel<T>;
  launch_kernel(kernel, grid_size(kernel, tiles, kLsqThreads), kLsqThreads, stream, grad, x, grad_x, shape, scale,
                offset, qmin, qmax, workspace, workspace + tiles);
  auto reduce = lsq_reduce_partials_kernel;
  const int64_t scale_groups = shape.scale_per_row ? shape.rows : 1;
  launch_kernel(reduce, grid_size(reduce, scale_groups, kLsqThreads), kLsqThreads, stream,
                static_cast<const double*>(workspace), scale_groups, tiles / scale_groups, grad_scale, scale_grad);
  const int64_t offset_groups = shape.offset_per_row ? shape.rows : 1;
  launch_kernel(reduce, grid_size(reduce, offset_groups, kLsqThreads), kLsqThreads, stream,
                static_cast<const double*>(workspace + tiles), offset_groups, tiles / offset_groups, 1.0, offset_grad);
}

// --- MinMax (fake_quantize) ------------------------------------------------------------------------------------

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

// Segments of the split path (few huge groups), or 0 when every group is one thread block's work. The
// fp32 kernel's occupancy decides for every dtype (the CPU splits by its own rule; results do not depend on it).
inline int64_t fake_quantize_segments(int64_t n, int64_t group_size) {
  const int64_t groups = ceil_div(n, group_size);
  const bool split = group_size > kFqSegment && groups < resident_blocks(fake_quant_groups_kernel<float>, kFqThreads);
  return split ? groups * ceil_div(std::min(group_size, n), kFqSegment) : 0;
}

// FqRange entries of workspace launch_fake_quantize needs.
inline int64_t fake_quantize_workspace(int64_t n, int64_t group_size) {
  return n == 0 ? 0 : fake_quantize_segments(n, group_size);
}

// out (fake-quantized in[0, n)), scale and zero_point per group of group_size elements; workspace holds
// fake_quantize_workspace(n, group_size) ranges (may be null when that is 0).
template <typename T>
void launch_fake_quantize(const T* in, T* out, int64_t n, int64_t group_size, bool symmetric, FakeQuantGrid grid,
                          float* scale, int32_t* zero_point, FqRange* workspace, cudaStream_t stream) {
  if (n == 0) return;
  const int64_t groups = ceil_div(n, group_size);
  const float limit = std::is_same_v<T, __half> ? 65504.0f : FLT_MAX;
  const int64_t segments = fake_quantize_segments(n, group_size);
  if (segments == 0) {
    auto kernel = fake_quant_groups_kernel<T>;
    launch_kernel(kernel, grid_size(kernel, groups, kFqThreads), kFqThreads, stream, in, out, n, group_size, groups,
                  symmetric, grid, limit, scale, zero_point);
    return;
  }
  BNBX_CUDA_ASSERT(workspace != nullptr, "fake_quantize: the split path needs its workspace");
  const int64_t per_group = segments / groups;
  auto ranges = fake_quant_segment_range_kernel<T>;
  launch_kernel(ranges, grid_size(ranges, segments, kFqThreads), kFqThreads, stream, in, n, group_size, per_group,
                segments, workspace);
  auto params = fake_quant_params_kernel;
  launch_kernel(params, grid_size(params, ceil_div(groups, int64_t{kFqThreads}), kFqThreads), kFqThreads, stream,
                static_cast<const FqRange*>(workspace), per_group, groups, symmetric, grid, scale, zero_point);
  auto apply = fake_quant_segment_apply_kernel<T>;
  launch_kernel(apply, grid_size(apply, segments, kFqThreads), kFqThreads, stream, in, out, n, group_size, per_group,
                segments, grid, limit, static_cast<const float*>(scale), static_cast<const int32_t*>(zero_point));
}

}  // namespace
}  // namespace bnbx::cuda

#if !defined(BNBX_CUDA_EMULATION)
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include "../common/checks_fake_quant.h"
#include "cuda_host.h"

namespace bnbx::cuda {
namespace {

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

  const FakeQuantGrid grid = fake_quant_grid(bits, symmetric, full_range);
  static_assert(sizeof(FqRange) == 3 * sizeof(float), "ranges are stored as three 4-byte words");
  const int64_t segments = fake_quantize_workspace(n, group_size);
  at::Tensor ranges = at::empty({segments, 3}, input.options().dtype(at::kFloat));
  dispatch_float(input.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    launch_fake_quantize<T>(
        static_cast<const T*>(input.const_data_ptr()), static_cast<T*>(out.mutable_data_ptr()), n, group_size,
        symmetric, grid, scale.mutable_data_ptr<float>(), zero_point.mutable_data_ptr<int32_t>(),
        segments ? reinterpret_cast<FqRange*>(ranges.mutable_data_ptr<float>()) : nullptr, current_stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, scale, zero_point};
}

// --- LSQ / LSQ+ host code ---------------------------------------------------------------------------------------

// Calls f(T{}) for the four dtypes of x fake_quantize_lsq takes.
template <typename F>
void dispatch_lsq(at::ScalarType dtype, const F& f) {
  if (dtype == at::kDouble) return f(double{});
  dispatch_float(dtype, f);
}

at::Tensor fake_quantize_lsq_cuda(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& offset, double qmin,
                                  double qmax, double grad_scale) {
  constexpr const char* op = "fake_quantize_lsq";
  const LsqLayout layout = check_fake_quantize_lsq_args(op, x, scale, offset, qmin, qmax);
  TORCH_CHECK_VALUE(std::isfinite(grad_scale), op, ": grad_scale must be finite, got ", grad_scale);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor input = x.contiguous();
  at::Tensor out = at::empty(input.sizes(), input.options());
  if (input.numel() == 0) return out;
  const at::ScalarType math = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor s = scale.to(math).contiguous(), o = offset.to(math).contiguous();
  const LsqShape shape = lsq_shape(layout.rows, layout.inner, layout.scale_per_row, layout.offset_per_row);
  dispatch_lsq(input.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using C = LsqC<T>;
    launch_fake_quantize_lsq<T>(static_cast<const T*>(input.const_data_ptr()), static_cast<T*>(out.mutable_data_ptr()),
                                shape, s.const_data_ptr<C>(), o.const_data_ptr<C>(), static_cast<C>(qmin),
                                static_cast<C>(qmax), current_stream());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quantize_lsq_backward_cuda(const at::Tensor& grad,
                                                                               const at::Tensor& x,
                                                                               const at::Tensor& scale,
                                                                               const at::Tensor& offset, double qmin,
                                                                               double qmax, double grad_scale) {
  constexpr const char* op = "fake_quantize_lsq_backward";
  const LsqLayout layout = check_fake_quantize_lsq_args(op, x, scale, offset, qmin, qmax);
  check_fake_quantize_lsq_grad(op, grad, x);
  TORCH_CHECK_VALUE(std::isfinite(grad_scale), op, ": grad_scale must be finite, got ", grad_scale);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor input = x.contiguous(), g = grad.contiguous();
  at::Tensor grad_x = at::empty(input.sizes(), input.options());
  if (input.numel() == 0) return {grad_x, at::zeros_like(scale), at::zeros_like(offset)};
  const at::ScalarType math = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor s = scale.to(math).contiguous(), o = offset.to(math).contiguous();
  const LsqShape shape = lsq_shape(layout.rows, layout.inner, layout.scale_per_row, layout.offset_per_row);
  const auto doubles = input.options().dtype(at::kDouble);
  at::Tensor workspace = at::empty({lsq_backward_workspace(shape)}, doubles);
  at::Tensor scale_grad = at::empty({layout.scale_per_row ? layout.rows : 1}, doubles);
  at::Tensor offset_grad = at::empty({layout.offset_per_row ? layout.rows : 1}, doubles);
  dispatch_lsq(input.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using C = LsqC<T>;
    launch_fake_quantize_lsq_backward<T>(
        static_cast<const T*>(g.const_data_ptr()), static_cast<const T*>(input.const_data_ptr()),
        static_cast<T*>(grad_x.mutable_data_ptr()), shape, s.const_data_ptr<C>(), o.const_data_ptr<C>(),
        static_cast<C>(qmin), static_cast<C>(qmax), grad_scale, workspace.mutable_data_ptr<double>(),
        scale_grad.mutable_data_ptr<double>(), offset_grad.mutable_data_ptr<double>(), current_stream());
  });
  return {grad_x, scale_grad.to(scale.scalar_type()).view(scale.sizes()),
          offset_grad.to(offset.scalar_type()).view(offset.sizes())};
}

}  // namespace

TORCH_LIBRARY_IMPL(bnbx, CUDA, m) {
  m.impl("fake_quantize", &fake_quantize_cuda);
  m.impl("fake_quantize_lsq", &fake_quantize_lsq_cuda);
  m.impl("fake_quantize_lsq_backward", &fake_quantize_lsq_backward_cuda);
}

}  // namespace bnbx::cuda
#endif  // !BNBX_CUDA_EMULATION
