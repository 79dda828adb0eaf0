// Helpers shared by the CUDA kernels: float conversions that round like the CPU reference, 16-byte vector
// loads and stores with masked tails, reductions over aligned groups of threads, the per-block scale rule,
// and host-side launch plumbing (dtype switch, grid size, alignment).
//
// Exactness: the CPU scalar loops (csrc/cpu/kernels/*_impl.h) define every result, and these kernels must
// give the same bits. CMakeLists.txt compiles CUDA with -fmad=false (no a*b+c contraction) and without
// fast-math, so `/` is IEEE division, denormals are kept, and every product rounds once, as on the CPU.
#pragma once

// No torch headers here: the kernels and their launchers also compile as plain C++ over a shim of the CUDA
// built-ins (csrc/cuda/emulation/), which runs them on the CPU in CI. Torch-facing host code is in
// cuda_host.h, included only by the part of each .cu that the emulation leaves out.
#if defined(BNBX_CUDA_EMULATION)
#include "emulation/cuda_shim.h"
#else
#include <c10/util/Exception.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include <algorithm>
#include <cfloat>
#include <cstdint>
#include <mutex>
#include <type_traits>
#include <vector>

#include "../common/formats.h"
#include "../common/rules.h"

// The NaN/Inf/subnormal contract needs IEEE arithmetic: CMakeLists.txt refuses fast-math flags for the kernels,
// and this stops a build that slipped one in some other way.
#if defined(__FAST_MATH__) || defined(__USE_FAST_MATH__)
#error \
    "bnbx: the CUDA kernels must be compiled without fast-math (-use_fast_math / -ffast-math): NaN, Inf and subnormal blocks would change"
#endif

// Internal invariants of the launchers (user input is checked before, in csrc/common/checks.h).
#if defined(BNBX_CUDA_EMULATION)
#define BNBX_CUDA_ASSERT(cond, what)      \
  do {                                    \
    if (!(cond)) ::bnbx::emu::fail(what); \
  } while (0)
#define BNBX_CUDA_CALL(expr) BNBX_CUDA_ASSERT((expr) == cudaSuccess, #expr " failed")
#else
#define BNBX_CUDA_ASSERT(cond, what) TORCH_INTERNAL_ASSERT(cond, what)
#define BNBX_CUDA_CALL(expr)                                                            \
  do {                                                                                  \
    const cudaError_t bnbx_error = (expr);                                              \
    TORCH_CHECK(bnbx_error == cudaSuccess, #expr ": ", cudaGetErrorString(bnbx_error)); \
  } while (0)
#endif

namespace bnbx::cuda {

constexpr int kWarpSize = 32;
constexpr int kMaxThreads = 1024;  // CUDA's limit per thread block; group reductions assume it
constexpr int kMaxWarps = kMaxThreads / kWarpSize;

// A NaN absmax/scale is stored as the CPU reference writes it: std::numeric_limits<float>::quiet_NaN().
constexpr uint32_t kQuietNaNBits = 0x7fc00000u;
// For non-negative floats the bit patterns order like the values, and every NaN pattern lies above +Inf:
// a block holds a NaN or an Inf exactly when its largest |x| pattern is above FLT_MAX's.
constexpr uint32_t kFloatMaxBits = 0x7f7fffffu;

// --- float types ---------------------------------------------------------------------------------------------

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// fp32 -> T as the CPU's store_from_float (csrc/cpu/kernels/float_convert.h): round to nearest even, and a
// NaN becomes sign | 0x7e00 in fp16 and 0x7fc0 in bf16 (the GPU conversions would give 0x7fff).
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  if (v != v) return __ushort_as_half(static_cast<unsigned short>(((__float_as_uint(v) >> 16) & 0x8000u) | 0x7e00u));
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return v != v ? __ushort_as_bfloat16(0x7fc0) : __float2bfloat16_rn(v);
}

// a * b giving the NaN an x86 CPU, where the reference runs, gives: a NaN operand comes back quieted (b, the
// absmax or scale, is the one that can be NaN), and an invalid product such as 0 * Inf is x86's default NaN
// 0xffc00000. A GPU returns 0x7fffffff for every NaN, so without this NaN blocks would differ in their bits.
__device__ __forceinline__ float mul_like_cpu(float a, float b) {
  const float product = a * b;
  if (product == product) return product;
  if (b != b) return __uint_as_float(__float_as_uint(b) | 0x00400000u);
  if (a != a) return __uint_as_float(__float_as_uint(a) | 0x00400000u);
  return __uint_as_float(0xffc00000u);
}

// Elements per 16-byte access: 4 fp32 or 8 fp16/bf16.
template <typename T>
constexpr int kVecElems = 16 / static_cast<int>(sizeof(T));

template <typename T, int kN>
struct alignas(sizeof(T) * kN) AlignedArray {
  T v[kN];
};

// An unsigned integer of kBytes bytes, for stores of packed codes (byte j = bits 8j..8j+7, little-endian).
template <int kBytes>
struct UIntOf;
template <>
struct UIntOf<2> {
  using type = uint16_t;
};
template <>
struct UIntOf<4> {
  using type = uint32_t;
};
template <>
struct UIntOf<8> {
  using type = uint64_t;
};
template <int kBytes>
using UInt = typename UIntOf<kBytes>::type;

// Reads elements [start, start + kVec) of in[0, n) as floats: one 16-byte load when the whole vector is in
// range (the caller guarantees 16-byte alignment of `in`), element loads at the tail; elements at or past n
// read as 0, which changes neither an absmax nor a min/max range that always holds 0.
template <typename T, int kVec>
__device__ __forceinline__ void load_floats(const T* __restrict__ in, int64_t start, int64_t n, float (&x)[kVec]) {
  if (start + kVec <= n) {
    const AlignedArray<T, kVec> vec = *reinterpret_cast<const AlignedArray<T, kVec>*>(in + start);
#pragma unroll
    for (int i = 0; i < kVec; ++i) x[i] = to_float(vec.v[i]);
  } else {
#pragma unroll
    for (int i = 0; i < kVec; ++i) x[i] = start + i < n ? to_float(in[start + i]) : 0.0f;
  }
}

// v converted to T, two at a time where the hardware converts pairs (one F2FP per two values). kNaN: v may
// hold NaNs, which then get the CPU's bit patterns (from_float); without it the plain conversions are used.
template <typename T, int kVec, bool kNaN>
__device__ __forceinline__ AlignedArray<T, kVec> convert_floats(const float (&v)[kVec]) {
  AlignedArray<T, kVec> result;
  if constexpr (kNaN || std::is_same_v<T, float>) {
#pragma unroll
    for (int i = 0; i < kVec; ++i) result.v[i] = from_float<T>(v[i]);
  } else {
#pragma unroll
    for (int i = 0; i < kVec; i += 2) {
      if constexpr (std::is_same_v<T, __half>) {
        const __half2 pair = __floats2half2_rn(v[i], v[i + 1]);
        result.v[i] = __low2half(pair);
        result.v[i + 1] = __high2half(pair);
      } else {
        const __nv_bfloat162 pair = __floats2bfloat162_rn(v[i], v[i + 1]);
        result.v[i] = __low2bfloat16(pair);
        result.v[i + 1] = __high2bfloat16(pair);
      }
    }
  }
  return result;
}

// Writes v[0, kVec) to out[start, ...), masked to out[0, n); see convert_floats for kNaN.
template <typename T, int kVec, bool kNaN = true>
__device__ __forceinline__ void store_floats(T* __restrict__ out, int64_t start, int64_t n, const float (&v)[kVec]) {
  const AlignedArray<T, kVec> converted = convert_floats<T, kVec, kNaN>(v);
  if (start + kVec <= n) {
    *reinterpret_cast<AlignedArray<T, kVec>*>(out + start) = converted;
  } else {
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      if (start + i < n) out[start + i] = converted.v[i];
    }
  }
}

// Reads bytes [start, start + kBytes) of bytes[0, size) as one little-endian word: a single aligned load when
// the word is in range, byte loads at the tail (missing bytes read as 0).
template <int kBytes>
__device__ __forceinline__ UInt<kBytes> load_word(const uint8_t* __restrict__ bytes, int64_t start, int64_t size) {
  if (start + kBytes <= size) return *reinterpret_cast<const UInt<kBytes>*>(bytes + start);
  UInt<kBytes> word = 0;
#pragma unroll
  for (int j = 0; j < kBytes; ++j) {
    if (start + j < size) word |= static_cast<UInt<kBytes>>(bytes[start + j]) << (8 * j);
  }
  return word;
}

// Writes the low `valid` bytes of word (all kBytes when valid >= kBytes) to bytes[start...].
template <int kBytes>
__device__ __forceinline__ void store_word(uint8_t* __restrict__ bytes, int64_t start, int64_t valid,
                                           UInt<kBytes> word) {
  if (valid >= kBytes) {
    *reinterpret_cast<UInt<kBytes>*>(bytes + start) = word;
    return;
  }
#pragma unroll
  for (int j = 0; j < kBytes; ++j) {
    if (j < valid) bytes[start + j] = static_cast<uint8_t>(word >> (8 * j));
  }
}

// --- reductions over aligned groups of threads ---------------------------------------------------------------

// A min/max range that always holds 0 (int8 quantization); `high` is +Inf when the range met a NaN or an Inf.
struct Range {
  float low;
  float high;
};

__device__ __forceinline__ uint32_t shfl_xor(uint32_t v, int mask) { return __shfl_xor_sync(0xffffffffu, v, mask); }
__device__ __forceinline__ Range shfl_xor(Range v, int mask) {
  return {__shfl_xor_sync(0xffffffffu, v.low, mask), __shfl_xor_sync(0xffffffffu, v.high, mask)};
}

struct MaxBits {
  __device__ __forceinline__ uint32_t operator()(uint32_t a, uint32_t b) const { return a > b ? a : b; }
};

// Written like the CPU's `x < low ? x : low` updates, so -0.0 never replaces +0.0: the result does not depend
// on the order of the reduction.
struct MergeRange {
  __device__ __forceinline__ Range operator()(Range a, Range b) const {
    return {b.low < a.low ? b.low : a.low, b.high > a.high ? b.high : a.high};
  }
};

// Reduces `value` over aligned groups of `group` consecutive threads (a power of two from 1 to blockDim.x,
// uniform over the thread block); every thread of a group gets its group's result. Groups of up to a warp
// use shuffles only; larger ones combine per-warp results through `scratch` (kMaxWarps entries) behind one
// barrier. Callers alternate between two scratch buffers on successive calls: a thread can only write
// buffer k again after passing the barrier of the call in between, which every reader of buffer k has
// reached only after its reads, so no second barrier is needed. Every thread of the block must call this
// (a barrier may be inside), including threads with nothing to load.
template <typename T, typename Op>
__device__ __forceinline__ T group_reduce(T value, int group, T* scratch, Op op) {
  const int width = group < kWarpSize ? group : kWarpSize;
  for (int mask = width / 2; mask > 0; mask /= 2) value = op(value, shfl_xor(value, mask));
  if (group <= kWarpSize) return value;
  const int warp = threadIdx.x / kWarpSize;
  if (threadIdx.x % kWarpSize == 0) scratch[warp] = value;
  __syncthreads();
  const int warps = group / kWarpSize;
  const int first = warp & ~(warps - 1);
  T result = scratch[first];
  for (int w = 1; w < warps; ++w) result = op(result, scratch[first + w]);
  return result;
}

// --- the per-block scale rule: BlockScale / block_scale in common/rules.h -------------------------------------

// Loads this thread's kVec elements (vector `vec` of in[0, n)) into x and returns the largest |x| pattern of
// its quantization block of 2^log2_group vectors (above kFloatMaxBits: the block is not finite). The groups
// of threads are aligned because each tile starts at a multiple of blockDim.x, a multiple of the group.
template <typename T, int kVec>
__device__ __forceinline__ uint32_t load_block_absmax_bits(const T* __restrict__ in, int64_t n, int64_t vec,
                                                           int log2_group, uint32_t* scratch, float (&x)[kVec]) {
  load_floats<T, kVec>(in, vec * kVec, n, x);
  uint32_t bits = 0;
#pragma unroll
  for (int i = 0; i < kVec; ++i) {
    const uint32_t magnitude = __float_as_uint(x[i]) & 0x7fffffffu;
    bits = magnitude > bits ? magnitude : bits;
  }
  return group_reduce(bits, 1 << log2_group, scratch, MaxBits{});
}

// --- host side: torch-free launch plumbing ----------------------------------------------------------------

inline int log2_exact(int64_t power_of_two) {
  int log2 = 0;
  while ((int64_t{1} << log2) < power_of_two) ++log2;
  BNBX_CUDA_ASSERT((int64_t{1} << log2) == power_of_two, "log2_exact: not a power of two");
  return log2;
}

inline int64_t next_power_of_two(int64_t x) {
  int64_t p = 1;
  while (p < x) p *= 2;
  return p;
}

// kernel<<<grid, threads, 0, stream>>>(args...), written as a call so the emulation can run it on the CPU.
// grid: a block count, or a dim3 for 2-D grids.
template <typename... Params, typename... Args>
inline void launch_kernel(void (*kernel)(Params...), dim3 grid, int threads, cudaStream_t stream, Args&&... args) {
#if defined(BNBX_CUDA_EMULATION)
  (void)stream;
  emu::launch(kernel, grid, dim3(static_cast<unsigned int>(threads)),
              std::tuple<Params...>(static_cast<Params>(args)...));
#else
  kernel<<<grid, static_cast<unsigned int>(threads), 0, stream>>>(static_cast<Params>(args)...);
#endif
}

// Thread blocks of `kernel` at `threads` per block that the current GPU holds at once, from the occupancy the
// compiled kernel really has (registers, shared memory), not an assumed one. Cached per kernel, block size
// and device: the driver's answers never change, and the call costs no synchronisation anyway. The cache is
// keyed by the kernel's address: kernels of one signature (one Kernel type) differ in occupancy.
template <typename Kernel>
inline int64_t resident_blocks(Kernel kernel, int threads) {
  struct Entry {
    const void* kernel;
    int device, threads;
    int64_t blocks;
  };
  static std::mutex mutex;
  static std::vector<Entry> cache;
  int device = 0;
  BNBX_CUDA_CALL(cudaGetDevice(&device));
  const void* key = reinterpret_cast<const void*>(kernel);
  {
    const std::lock_guard<std::mutex> lock(mutex);
    for (const Entry& e : cache) {
      if (e.kernel == key && e.device == device && e.threads == threads) return e.blocks;
    }
  }
  int sms = 0, per_sm = 0;
  BNBX_CUDA_CALL(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  BNBX_CUDA_CALL(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, 0));
  const int64_t blocks = static_cast<int64_t>(std::max(1, sms)) * std::max(1, per_sm);
  const std::lock_guard<std::mutex> lock(mutex);
  cache.push_back({key, device, threads, blocks});
  return blocks;
}

// Grid for a grid-stride kernel: enough thread blocks to fill every SM, never more than there is work. Each
// block then loops over tiles, so no tensor size can exceed the grid limits, and per-block setup
// (shared-memory tables) is paid once per block rather than once per tile.
template <typename Kernel>
inline unsigned int grid_size(Kernel kernel, int64_t tiles, int threads) {
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min(tiles, resident_blocks(kernel, threads))));
}

BNBX_HOST_DEVICE inline bool is_aligned(const void* ptr, size_t alignment) {
  return reinterpret_cast<uintptr_t>(ptr) % alignment == 0;
}

}  // namespace bnbx::cuda
