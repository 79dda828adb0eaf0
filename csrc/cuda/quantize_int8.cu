// CUDA int8 absmax (symmetric) / zero-point (asymmetric) quantization over contiguous groups of the flattened
// input: host code, then the kernels. The results are the bits of the CPU reference,
// csrc/cpu/kernels/quantize_int8_impl.h (int8_group_params, quantize_int8_generic, dequantize_int8_generic).
//
// group_size is any positive integer, so groups start at arbitrary element offsets: the kernels use element
// loads, coalesced because consecutive threads read consecutive elements. Work is cut into segments: a
// segment is a whole group, or, when a few huge groups would leave most SMs idle (per-tensor scales), a
// kSegment-element slice of one group. A power-of-two team of threads covers each segment.
//   quantize, whole groups: one kernel; the team reduces the group's min/max range, derives scale and zero
//     point, then quantizes its group (the second read mostly hits L1/L2).
//   quantize, split groups: a range per segment, then a reduction of those per group into scale and zero
//     point, then quantization of every segment from the stored scale and zero point (three kernels).
//   dequantize: one kernel over segments, no reduction.
#include <type_traits>

#include "cuda_utils.cuh"

namespace bnbx::cuda {
namespace {

constexpr int kThreads = 256;          // per thread block, unless one segment's team needs more
constexpr int64_t kSegment = 16384;    // elements per slice of a split group: 16 per thread of a 1024 team
constexpr int kElementsPerThread = 8;  // a team has about segment/8 threads (a power of two, 1 .. 1024)

// Where the segments lie. A group is [g * group_size, min(n, (g + 1) * group_size)); segment k of group g is
// [group_start + k * segment_size, ...) clipped to the group, and may be empty in a short last group.
struct Int8Layout {
  int64_t n;
  int64_t group_size;
  int64_t segment_size;        // group_size, or kSegment when groups are split
  int64_t segments_per_group;  // 1, or ceil(min(group_size, n) / kSegment)
  int64_t segments;            // groups * segments_per_group
  int log2_team;               // threads per segment: 2^log2_team
  bool vectorized;             // group_size (and so every segment start) is a multiple of the vector width
};

struct Segment {
  int64_t group;
  int64_t start;
  int64_t end;
};

__device__ __forceinline__ Segment locate(const Int8Layout& layout, int64_t segment) {
  // the 64-bit division only runs for split groups, where a team has thousands of elements to amortise it
  const int64_t group = layout.segments_per_group == 1 ? segment : segment / layout.segments_per_group;
  const int64_t slice = segment - group * layout.segments_per_group;
  const int64_t group_start = group * layout.group_size;
  const int64_t group_end = group_start + min(layout.group_size, layout.n - group_start);  // no overflow
  const int64_t start = min(group_end, group_start + slice * layout.segment_size);
  return {group, start, start + min(layout.segment_size, group_end - start)};
}

// --- the arithmetic of quantize_int8_impl.h ----------------------------------------------------------------------

// The running range of int8_group_params, with `high` = +Inf marking a NaN or an Inf met (finite values
// are at most FLT_MAX, so the mark cannot be mistaken for data).
__device__ __forceinline__ Range extend(Range range, float x) {
  range.low = x < range.low ? x : range.low;
  range.high = fabsf(x) <= FLT_MAX ? (x > range.high ? x : range.high) : __uint_as_float(0x7f800000u);
  return range;
}

// int8_group_params after its loop, from the group's range (the rule: int8_params_from_range, common/rules.h).
__device__ __forceinline__ Int8Params int8_params(Range range, bool symmetric) {
  return int8_params_from_range(range.low, range.high, range.high > FLT_MAX, symmetric);
}

// The same parameters rebuilt from what int8_params stored: a NaN scale only comes from a non-finite group,
// and both branches above give inv_scale = (scale == 0 ? 0 : 1 / scale) otherwise.
__device__ __forceinline__ Int8Params int8_params_from_stored(float scale, int32_t zero_point) {
  const bool nonfinite = scale != scale;
  return {scale, nonfinite || scale == 0.0f ? 0.0f : 1.0f / scale, zero_point, nonfinite};
}

// One code of quantize_int8_generic; the branches are uniform over a team (one group's parameters).
__device__ __forceinline__ int8_t int8_code_of(float x, const Int8Params& params, float zp, float qmin) {
  if (params.nonfinite) return 0;  // NaN/Inf contract: scale NaN, zero point 0, q 0
  // a subnormal scale overflows 1/scale: divide instead (exact, rare)
  return int8_code(isinf(params.inv_scale) ? x / params.scale : x * params.inv_scale, zp, qmin);
}

// Reads of a segment [start, end) by one thread of its team (lane of team): with 16-byte vector loads, two in
// flight per thread, when the layout is vectorized (start is then a multiple of kVec and `in` is 16-byte
// aligned; elements at or past `end` read as 0, which no range and no code ever keeps); otherwise element
// loads unrolled by four, four independent loads in flight. f(index, x[], count) sees kVec (or 4) values.
constexpr int kInt8Unroll = 2;

template <typename T, typename F>
__device__ __forceinline__ void for_segment(const T* __restrict__ in, int64_t start, int64_t end, int lane, int team,
                                            bool vectorized, const F& f) {
  constexpr int kVec = kVecElems<T>;
  if (vectorized) {
    const int64_t stride = int64_t{team} * kVec;
    for (int64_t i = start + int64_t{lane} * kVec; i < end; i += kInt8Unroll * stride) {
      float x[kInt8Unroll][kVec];
#pragma unroll
      for (int u = 0; u < kInt8Unroll; ++u) load_floats<T, kVec>(in, i + u * stride, end, x[u]);
#pragma unroll
      for (int u = 0; u < kInt8Unroll; ++u) {
        if (i + u * stride < end) f(i + u * stride, x[u], kVec);
      }
    }
    return;
  }
  int64_t i = start + lane;
  for (; i + 3 * int64_t{team} < end; i += 4 * int64_t{team}) {
    float x[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) x[u] = to_float(in[i + u * int64_t{team}]);
    f(i, x, -team);  // a negative count: 4 values `team` apart
  }
  for (; i < end; i += team) {
    float x[1] = {to_float(in[i])};
    f(i, x, 1);
  }
}

template <typename T>
__device__ __forceinline__ Range segment_range(const T* __restrict__ in, int64_t start, int64_t end, int lane, int team,
                                               bool vectorized) {
  Range range{0.0f, 0.0f};
  for_segment(in, start, end, lane, team, vectorized, [&](int64_t, const float* x, int count) {
    const int values = count < 0 ? 4 : count;
    for (int k = 0; k < values; ++k) range = extend(range, x[k]);
  });
  return range;
}

// Quantizes a segment as quantize_int8_generic's loops do: codes of a vector leave as one kVec-byte store.
template <typename T>
__device__ __forceinline__ void quantize_segment(const T* __restrict__ in, int64_t start, int64_t end, int lane,
                                                 int team, bool vectorized, const Int8Params& params, bool symmetric,
                                                 int8_t* __restrict__ q) {
  constexpr int kVec = kVecElems<T>;
  const float qmin = symmetric ? -127.0f : -128.0f;
  const float zp = static_cast<float>(params.zero_point);
  uint8_t* bytes = reinterpret_cast<uint8_t*>(q);
  for_segment(in, start, end, lane, team, vectorized, [&](int64_t i, const float* x, int count) {
    if (count == kVec && vectorized) {
      UInt<kVec> word = 0;
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        word |= static_cast<UInt<kVec>>(static_cast<uint8_t>(int8_code_of(x[k], params, zp, qmin))) << (8 * k);
      }
      store_word<kVec>(bytes, i, end - i, word);
    } else if (count < 0) {
      for (int u = 0; u < 4; ++u) q[i + u * int64_t{-count}] = int8_code_of(x[u], params, zp, qmin);
    } else {
      q[i] = int8_code_of(x[0], params, zp, qmin);
    }
  });
}

// --- kernels -----------------------------------------------------------------------------------------------------

// Whole groups (segments_per_group == 1): range, parameters and codes in one pass over each group.
template <typename T>
__global__ void __launch_bounds__(kMaxThreads)
    quantize_int8_kernel(const T* __restrict__ in, Int8Layout layout, bool symmetric, int8_t* __restrict__ q,
                         float* __restrict__ scale, int32_t* __restrict__ zero_point) {
  __shared__ Range scratch[2][kMaxWarps];
  const int team = 1 << layout.log2_team;
  const int lane = threadIdx.x & (team - 1);
  const int teams = blockDim.x >> layout.log2_team;
  int parity = 0;
  // Every thread runs the same iterations (the bound depends on the block only): all reach the barrier.
  for (int64_t first = int64_t{blockIdx.x} * teams; first < layout.segments;
       first += int64_t{gridDim.x} * teams, parity ^= 1) {
    const int64_t segment = first + (threadIdx.x >> layout.log2_team);
    const bool valid = segment < layout.segments;
    const Segment seg = valid ? locate(layout, segment) : Segment{0, 0, 0};
    Range range = segment_range(in, seg.start, seg.end, lane, team, layout.vectorized);
    range = group_reduce(range, team, scratch[parity], MergeRange{});
    if (!valid) continue;
    const Int8Params params = int8_params(range, symmetric);
    if (lane == 0) {
      scale[seg.group] = params.scale;
      zero_point[seg.group] = params.zero_point;
    }
    quantize_segment(in, seg.start, seg.end, lane, team, layout.vectorized, params, symmetric, q);
  }
}

// Split groups, step 1: the range of every segment.
template <typename T>
__global__ void __launch_bounds__(kMaxThreads)
    int8_segment_range_kernel(const T* __restrict__ in, Int8Layout layout, Range* __restrict__ ranges) {
  __shared__ Range scratch[2][kMaxWarps];
  const int team = 1 << layout.log2_team;
  const int lane = threadIdx.x & (team - 1);
  const int teams = blockDim.x >> layout.log2_team;
  int parity = 0;
  // Every thread runs the same iterations (the bound depends on the block only): all reach the barrier.
  for (int64_t first = int64_t{blockIdx.x} * teams; first < layout.segments;
       first += int64_t{gridDim.x} * teams, parity ^= 1) {
    const int64_t segment = first + (threadIdx.x >> layout.log2_team);
    const bool valid = segment < layout.segments;
    const Segment seg = valid ? locate(layout, segment) : Segment{0, 0, 0};
    Range range = segment_range(in, seg.start, seg.end, lane, team, layout.vectorized);
    range = group_reduce(range, team, scratch[parity], MergeRange{});
    if (valid && lane == 0) ranges[segment] = range;
  }
}

// Split groups, step 2: one thread block per group merges its segments' ranges into scale and zero point.
__global__ void __launch_bounds__(kThreads)
    int8_group_params_kernel(const Range* __restrict__ ranges, Int8Layout layout, bool symmetric,
                             float* __restrict__ scale, int32_t* __restrict__ zero_point) {
  __shared__ Range scratch[2][kMaxWarps];
  const int64_t groups = layout.segments / layout.segments_per_group;
  int parity = 0;
  for (int64_t group = blockIdx.x; group < groups; group += gridDim.x, parity ^= 1) {
    const Range* first = ranges + group * layout.segments_per_group;
    Range range{0.0f, 0.0f};  // {0, 0} is neutral: every range holds 0
    for (int64_t k = threadIdx.x; k < layout.segments_per_group; k += blockDim.x) range = MergeRange{}(range, first[k]);
    range = group_reduce(range, static_cast<int>(blockDim.x), scratch[parity], MergeRange{});
    if (threadIdx.x == 0) {
      const Int8Params params = int8_params(range, symmetric);
      scale[group] = params.scale;
      zero_point[group] = params.zero_point;
    }
  }
}

// Split groups, step 3: quantize every segment with its group's stored parameters.
template <typename T>
__global__ void __launch_bounds__(kMaxThreads)
    int8_quantize_segments_kernel(const T* __restrict__ in, Int8Layout layout, bool symmetric,
                                  const float* __restrict__ scale, const int32_t* __restrict__ zero_point,
                                  int8_t* __restrict__ q) {
  const int team = 1 << layout.log2_team;
  const int lane = threadIdx.x & (team - 1);
  const int teams = blockDim.x >> layout.log2_team;
  for (int64_t first = int64_t{blockIdx.x} * teams; first < layout.segments; first += int64_t{gridDim.x} * teams) {
    const int64_t segment = first + (threadIdx.x >> layout.log2_team);
    if (segment >= layout.segments) continue;
    const Segment seg = locate(layout, segment);
    const Int8Params params = int8_params_from_stored(scale[seg.group], zero_point[seg.group]);
    quantize_segment(in, seg.start, seg.end, lane, team, layout.vectorized, params, symmetric, q);
  }
}

// kInt8DequantizeLimit of the CPU reference: zero-point rounding can rebuild up to half a step past the
// original maximum, which in fp16 can pass 65504, so fp16 output saturates to its finite range.
template <typename T>
constexpr float kDequantizeLimit = std::is_same_v<T, __half> ? 65504.0f : FLT_MAX;

// out[i] = (q[i] - zero_point) * scale in fp32, clamped to kDequantizeLimit (NaN stays NaN), one rounding to T.
// Elementwise, independent of the segments: each thread reads 16 codes with one 16-byte load (kInt8Unroll
// loads in flight) and writes them with 16-byte stores. The group of the first code costs one division; the
// others step across group boundaries (group_size may be 1, so several can fall inside one vector).
constexpr int kCodesPerVector = 16;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    dequantize_int8_kernel(const int8_t* __restrict__ q, const float* __restrict__ scale,
                           const int32_t* __restrict__ zero_point, int64_t n, int64_t group_size, T* __restrict__ out) {
  constexpr int kVec = kVecElems<T>;
  constexpr int64_t kTile = int64_t{kThreads} * kInt8Unroll;
  const uint8_t* bytes = reinterpret_cast<const uint8_t*>(q);
  const int64_t vectors = ceil_div(n, kCodesPerVector);
  for (int64_t tile = int64_t{blockIdx.x} * kTile; tile < vectors; tile += int64_t{gridDim.x} * kTile) {
    AlignedArray<uint32_t, 4> words[kInt8Unroll];
#pragma unroll
    for (int u = 0; u < kInt8Unroll; ++u) {
      const int64_t start = (tile + u * kThreads + threadIdx.x) * kCodesPerVector;
      if (start + kCodesPerVector <= n) {
        words[u] = *reinterpret_cast<const AlignedArray<uint32_t, 4>*>(bytes + start);
      } else {
#pragma unroll
        for (int w = 0; w < 4; ++w) words[u].v[w] = start < n ? load_word<4>(bytes, start + 4 * w, n) : 0u;
      }
    }
#pragma unroll
    for (int u = 0; u < kInt8Unroll; ++u) {
      const int64_t start = (tile + u * kThreads + threadIdx.x) * kCodesPerVector;
      if (start >= n) continue;
      int64_t group = start / group_size;
      int64_t boundary = (group + 1) * group_size;  // first element of the next group
      float group_scale = scale[group];
      float zp = static_cast<float>(zero_point[group]);
      float values[kCodesPerVector];
#pragma unroll
      for (int j = 0; j < kCodesPerVector; ++j) {
        if (start + j == boundary && start + j < n) {
          ++group;
          boundary += group_size;
          group_scale = scale[group];
          zp = static_cast<float>(zero_point[group]);
        }
        const int8_t code = static_cast<int8_t>(words[u].v[j / 4] >> (8 * (j % 4)));
        const float value = mul_like_cpu(static_cast<float>(code) - zp, group_scale);
        values[j] = std_max(std_min(value, kDequantizeLimit<T>), -kDequantizeLimit<T>);
      }
#pragma unroll
      for (int c = 0; c < kCodesPerVector / kVec; ++c) {
        float chunk[kVec];
#pragma unroll
        for (int k = 0; k < kVec; ++k) chunk[k] = values[c * kVec + k];
        store_floats<T, kVec>(out, start + c * kVec, n, chunk);
      }
    }
  }
}

// --- launchers (raw pointers, no torch: the emulation calls these too) ------------------------------------------

Int8Layout make_layout(int64_t n, int64_t group_size, bool split) {
  Int8Layout layout{};
  layout.n = n;
  layout.group_size = group_size;
  layout.segment_size = split ? kSegment : group_size;
  // every group but the last has group_size elements, and a group_size beyond n means one group of n
  layout.segments_per_group = split ? ceil_div(std::min(group_size, n), kSegment) : 1;
  layout.segments = ceil_div(n, group_size) * layout.segments_per_group;
  const int64_t team = next_power_of_two(ceil_div(std::min(layout.segment_size, n), kElementsPerThread));
  layout.log2_team = log2_exact(std::min<int64_t>(team, kMaxThreads));
  return layout;
}

// Vector loads need every segment to start on a vector boundary of the 16-byte aligned input.
template <typename T>
Int8Layout make_layout_for(const T* in, int64_t n, int64_t group_size, bool split) {
  Int8Layout layout = make_layout(n, group_size, split);
  layout.vectorized = group_size % kVecElems<T> == 0 && kSegment % kVecElems<T> == 0 && is_aligned(in, 16);
  return layout;
}

int threads_per_block(const Int8Layout& layout) { return std::max(1 << layout.log2_team, kThreads); }

template <typename Kernel>
unsigned int segment_grid(Kernel kernel, const Int8Layout& layout) {
  const int threads = threads_per_block(layout);
  return grid_size(kernel, ceil_div(layout.segments, threads >> layout.log2_team), threads);
}

// Whole groups leave SMs idle when there are fewer of them than thread blocks the GPU holds at once; split
// them when they are big enough to be worth the extra pass (a per-tensor scale over a large tensor).
template <typename T>
bool split_groups(int64_t n, int64_t group_size) {
  if (std::min(group_size, n) <= 2 * kSegment) return false;
  const Int8Layout whole = make_layout(n, group_size, false);
  const int threads = threads_per_block(whole);
  return ceil_div(whole.segments, threads >> whole.log2_team) < resident_blocks(quantize_int8_kernel<T>, threads);
}

// Ranges (pairs of floats) the quantize launcher needs as workspace: one per segment when groups are split.
template <typename T>
int64_t quantize_int8_workspace(int64_t n, int64_t group_size) {
  return split_groups<T>(n, group_size) ? make_layout(n, group_size, true).segments : 0;
}

// in[n] -> q[n], scale and zero_point [ceil(n/group_size)]; workspace holds quantize_int8_workspace ranges.
template <typename T>
void launch_quantize_int8(const T* in, int64_t n, int64_t group_size, bool symmetric, int8_t* q, float* scale,
                          int32_t* zero_point, Range* workspace, cudaStream_t stream) {
  const bool split = split_groups<T>(n, group_size);
  const Int8Layout layout = make_layout_for(in, n, group_size, split);
  const int threads = threads_per_block(layout);
  if (!split) {
    const auto kernel = quantize_int8_kernel<T>;
    launch_kernel(kernel, segment_grid(kernel, layout), threads, stream, in, layout, symmetric, q, scale, zero_point);
    return;
  }
  const auto ranges = int8_segment_range_kernel<T>;
  launch_kernel(ranges, segment_grid(ranges, layout), threads, stream, in, layout, workspace);
  const auto params = int8_group_params_kernel;
  launch_kernel(params, grid_size(params, ceil_div(n, group_size), kThreads), kThreads, stream,
                static_cast<const Range*>(workspace), layout, symmetric, scale, zero_point);
  const auto codes = int8_quantize_segments_kernel<T>;
  launch_kernel(codes, segment_grid(codes, layout), threads, stream, in, layout, symmetric,
                static_cast<const float*>(scale), static_cast<const int32_t*>(zero_point), q);
}

// q[n] (16-byte aligned), scale, zero_point -> out[n] (16-byte aligned); n > 0.
template <typename T>
void launch_dequantize_int8(const int8_t* q, const float* scale, const int32_t* zero_point, int64_t n,
                            int64_t group_size, T* out, cudaStream_t stream) {
  const int64_t tiles = ceil_div(ceil_div(n, kCodesPerVector), int64_t{kThreads} * kInt8Unroll);
  const auto kernel = dequantize_int8_kernel<T>;
  launch_kernel(kernel, grid_size(kernel, tiles, kThreads), kThreads, stream, q, scale, zero_point, n, group_size, out);
}

}  // namespace
}  // namespace bnbx::cuda

#if !defined(BNBX_CUDA_EMULATION)
// --- torch host code ---------------------------------------------------------------------------------------------
#include <torch/library.h>

#include "cuda_host.h"

namespace bnbx::cuda {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_int8_cuda(const at::Tensor& A, int64_t group_size,
                                                                  bool symmetric) {
  check_quantize_int8_args(A, group_size);
  const c10::cuda::CUDAGuard guard(A.device());
  const at::Tensor input = contiguous_aligned(A);
  const int64_t n = input.numel();
  const int64_t groups = ceil_div(n, group_size);
  at::Tensor q = at::empty(input.sizes(), input.options().dtype(at::kChar));
  at::Tensor scale = at::empty({groups}, input.options().dtype(at::kFloat));
  at::Tensor zero_point = at::empty({groups}, input.options().dtype(at::kInt));
  if (n == 0) return {q, scale, zero_point};

  dispatch_float(input.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    static_assert(sizeof(Range) == 2 * sizeof(float), "ranges are stored as float pairs");
    const int64_t ranges = quantize_int8_workspace<T>(n, group_size);
    at::Tensor workspace = at::empty({std::max<int64_t>(ranges, 1), 2}, input.options().dtype(at::kFloat));
    launch_quantize_int8<T>(static_cast<const T*>(input.const_data_ptr()), n, group_size, symmetric,
                            q.mutable_data_ptr<int8_t>(), scale.mutable_data_ptr<float>(),
                            zero_point.mutable_data_ptr<int32_t>(),
                            reinterpret_cast<Range*>(workspace.mutable_data_ptr<float>()), current_stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {q, scale, zero_point};
}

at::Tensor dequantize_int8_cuda(const at::Tensor& A, const at::Tensor& scale, const at::Tensor& zero_point,
                                int64_t group_size, at::ScalarType dtype) {
  check_dequantize_int8_args(A, scale, zero_point, group_size, dtype);
  const c10::cuda::CUDAGuard guard(A.device());
  const at::Tensor q = contiguous_aligned(A);
  const at::Tensor scales = scale.contiguous();
  const at::Tensor zero_points = zero_point.contiguous();
  const int64_t n = q.numel();
  at::Tensor out = at::empty(q.sizes(), q.options().dtype(dtype));
  if (n == 0) return out;

  dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    launch_dequantize_int8<T>(q.const_data_ptr<int8_t>(), scales.const_data_ptr<float>(),
                              zero_points.const_data_ptr<int32_t>(), n, group_size,
                              static_cast<T*>(out.mutable_data_ptr()), current_stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace bnbx::cuda

TORCH_LIBRARY_IMPL(bnbx, CUDA, m) {
  m.impl("quantize_int8", &bnbx::cuda::quantize_int8_cuda);
  m.impl("dequantize_int8", &bnbx::cuda::dequantize_int8_cuda);
}
#endif  // !BNBX_CUDA_EMULATION
