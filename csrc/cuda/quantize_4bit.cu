// CUDA 4-bit blockwise (NF4/FP4) quantize / dequantize: host code, then the kernels. The results are the
// bits of the CPU reference, csrc/cpu/kernels/quantize_4bit_impl.h (quantize_4bit_generic,
// dequantize_4bit_generic); the layout is described in csrc/common/formats.h.
//
// quantize_4bit_kernel: each thread loads 16 bytes of input (4 fp32 or 8 fp16/bf16 elements) and keeps them
// in registers; the 2^k threads covering one quantization block find its absmax with an integer max over
// |x| bit patterns (which also flags NaN/Inf, see cuda_utils.cuh), then each thread codes its elements through
// a small table in shared memory (below) and writes its 2 or 4 packed bytes. A warp's stores are contiguous,
// so the packed output is written coalesced.
//
// dequantize_4bit_kernel: each thread reads 2 or 4 packed bytes and writes 16 bytes of output; the 16 code
// values sit in shared memory (16 words in 16 banks: no bank conflicts) and absmax is read once per vector.
#include <cstring>
#include <limits>

#include "cuda_utils.cuh"

namespace bnbx::cuda {
namespace {

// --- 4-bit codes ---------------------------------------------------------------------------------------------

// The code of a scaled value x is "the number of thresholds t with x > t" (nf4_code / fp4_code in
// formats.h). A 4-level compare-and-select tree costs about 19 instructions per element, too many to keep up
// with HBM for 16-bit inputs, so the kernel looks the code up instead. x is cut into ~2^-6-wide buckets by
// the top bits of x + 3.0f (for NF4; |x| + 1.0f for FP4): rounding is monotone, so every threshold in an
// earlier bucket is below x and every one in a later bucket above it, and only the at most one threshold in
// x's own bucket needs a compare. Each bucket entry holds that threshold (+Inf if none) and the code(s):
//   NF4: code = below + (x > threshold), below = number of thresholds in earlier buckets;
//   FP4: code = (x > threshold ? high : low nibble of `codes`) | sign.
// About 8 instructions and one conflict-light 8-byte shared load per element; same codes by construction.

// The tables of formats.h as constexpr aggregates: device code may read these at constant indices (nvcc does
// not let it read the namespace-scope constexpr arrays), so the values are never retyped here.
template <typename T, int kN>
struct ConstArray {
  T v[kN];
};

template <typename T, int kN>
constexpr ConstArray<T, kN> make_table(const T (&values)[kN]) {
  ConstArray<T, kN> table{};
  for (int i = 0; i < kN; ++i) table.v[i] = values[i];
  return table;
}

// Bucket widths: 2^-6 of x for NF4 (x + 3 in [2, 4], 16 dropped bits of a 23-bit mantissa with exponent 1),
// 2^-7 of |x| for FP4 (|x| + 1 in [1, 2]). Thresholds further apart than two widths never share a bucket.
template <int kN>
constexpr bool gaps_wider_than(const ConstArray<float, kN>& table, float gap) {
  for (int i = 0; i + 1 < kN; ++i) {
    if (!(table.v[i + 1] - table.v[i] > gap)) return false;
  }
  return true;
}
static_assert(gaps_wider_than(make_table(kNF4Thresholds), 2.0f / 64), "NF4 thresholds must increase, one per bucket");
static_assert(gaps_wider_than(make_table(kFP4Thresholds), 2.0f / 128), "FP4 thresholds must increase, one per bucket");

// A scaled x lies in [-1 - 2^-23, 1 + 2^-23] (|v| <= absmax and 1/absmax is rounded once), so x + 3 rounds
// into [2 - 2^-23, 4] and |x| + 1 into [1, 2]; the min() only keeps a broken invariant inside the table.
constexpr uint32_t kNF4Buckets = 130;  // (bits(x + 3) >> 16) - 0x3fff: 0 (just below 2.0) .. 129 (4.0)
constexpr uint32_t kFP4Buckets = 129;  // (bits(|x| + 1) >> 16) - 0x3f80: 0 .. 128 (2.0)

__host__ __device__ __forceinline__ uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return bits;
#endif
}

__host__ __device__ __forceinline__ uint32_t nf4_bucket(float x) {
  const uint32_t bucket = (float_bits(x + 3.0f) >> 16) - 0x3fffu;
  return bucket < kNF4Buckets - 1 ? bucket : kNF4Buckets - 1;
}

__host__ __device__ __forceinline__ uint32_t fp4_bucket(float magnitude) {
  const uint32_t bucket = (float_bits(magnitude + 1.0f) >> 16) - 0x3f80u;
  return bucket < kFP4Buckets - 1 ? bucket : kFP4Buckets - 1;
}

struct alignas(8) CodeBucket {
  float threshold;  // the threshold inside this bucket, +Inf if none
  uint32_t codes;   // NF4: thresholds below the bucket; FP4: code at or below the threshold | code above << 4
};

template <QuantType kType>
constexpr uint32_t kBuckets = kType == QuantType::kNF4 ? kNF4Buckets : kFP4Buckets;

// Entry `bucket` of the table, from formats.h's thresholds through the same bucket function as the lookup.
template <QuantType kType>
__host__ __device__ inline CodeBucket make_code_bucket(uint32_t bucket) {
  CodeBucket entry{std::numeric_limits<float>::infinity(), 0};
  if constexpr (kType == QuantType::kNF4) {
    constexpr ConstArray<float, 15> t = make_table(kNF4Thresholds);
#pragma unroll
    for (int i = 0; i < 15; ++i) {
      const uint32_t at = nf4_bucket(t.v[i]);
      entry.codes += at < bucket ? 1 : 0;
      if (at == bucket) entry.threshold = t.v[i];
    }
  } else {
    constexpr ConstArray<float, 7> t = make_table(kFP4Thresholds);
    // kFP4BucketToCode as nibbles of one word, so the lookups below are shifts (no local-memory array)
    constexpr uint32_t to_code = [] {
      uint32_t nibbles = 0;
      for (int i = 0; i < 8; ++i) nibbles |= static_cast<uint32_t>(kFP4BucketToCode[i]) << (4 * i);
      return nibbles;
    }();
    uint32_t below = 0;
#pragma unroll
    for (int i = 0; i < 7; ++i) {
      const uint32_t at = fp4_bucket(t.v[i]);
      below += at < bucket ? 1 : 0;
      if (at == bucket) entry.threshold = t.v[i];
    }
    // below + 1 <= 7 whenever a threshold lies in the bucket; otherwise the high nibble is never used
    const uint32_t low = (to_code >> (4 * below)) & 0x7u;
    const uint32_t high = below < 7 ? (to_code >> (4 * (below + 1))) & 0x7u : 0;
    entry.codes = low | high << 4;
  }
  return entry;
}

template <QuantType kType>
__host__ __device__ __forceinline__ uint32_t bucket_of(float x) {
  if constexpr (kType == QuantType::kNF4) {
    return nf4_bucket(x);
  } else {
    return fp4_bucket(fabsf(x));
  }
}

// The code of x from its bucket's entry (see above).
template <QuantType kType>
__host__ __device__ __forceinline__ uint32_t code_in_bucket(float x, float threshold, uint32_t codes) {
  if constexpr (kType == QuantType::kNF4) {
    return codes + (x > threshold ? 1 : 0);
  } else {
    const float magnitude = fabsf(x);
    const uint32_t code = (codes >> (magnitude > threshold ? 4 : 0)) & 0x7u;
    return code | (x < 0.0f ? 0x8u : 0x0u);  // x < 0, so -0.0 keeps sign 0 as on the CPU
  }
}

// nf4_code(x) / fp4_code(x) of formats.h for x in [-1 - 2^-23, 1 + 2^-23] (checked exhaustively against them).
template <QuantType kType>
__host__ __device__ __forceinline__ uint32_t code_4bit(float x, const CodeBucket* buckets) {
  const CodeBucket entry = buckets[bucket_of<kType>(x)];
  return code_in_bucket<kType>(x, entry.threshold, entry.codes);
}

// The bucket table once per warp lane, so the lookup is free of bank conflicts: lane l reads word b * 32 + l
// of each array, always bank l, whatever buckets the 32 lanes pick (one table would put lanes that pick
// different buckets in the same bank). 2 x 4 bytes x 32 x 130 = 33 KB of shared memory, filled once per
// thread block (the grid is sized to stay resident).
template <QuantType kType>
struct LaneBuckets {
  float threshold[kBuckets<kType>][kWarpSize];
  uint32_t codes[kBuckets<kType>][kWarpSize];
};

template <QuantType kType>
__device__ __forceinline__ void fill_lane_buckets(LaneBuckets<kType>& table) {
  // one entry per thread, written to its 32 copies in a rotated order so a warp's stores hit 32 banks
  for (uint32_t bucket = threadIdx.x; bucket < kBuckets<kType>; bucket += blockDim.x) {
    const CodeBucket entry = make_code_bucket<kType>(bucket);
    for (uint32_t k = 0; k < kWarpSize; ++k) {
      const uint32_t copy = (k + bucket) % kWarpSize;
      table.threshold[bucket][copy] = entry.threshold;
      table.codes[bucket][copy] = entry.codes;
    }
  }
}

template <QuantType kType>
__device__ __forceinline__ uint32_t code_4bit_lane(float x, const LaneBuckets<kType>& table, uint32_t lane) {
  const uint32_t bucket = bucket_of<kType>(x);
  return code_in_bucket<kType>(x, table.threshold[bucket][lane], table.codes[bucket][lane]);
}

template <QuantType kType>
constexpr uint32_t kZeroCode = kType == QuantType::kNF4 ? kNF4ZeroCode : kFP4ZeroCode;

// --- kernels -----------------------------------------------------------------------------------------------------

constexpr int kThreads = 256;      // per thread block, unless one quantization block needs more threads
constexpr int kDequantUnroll = 2;  // vectors in flight per thread in dequantize (more loads outstanding)

constexpr int kQuantUnroll = 2;  // vectors in flight per thread in quantize

// Two absmax patterns reduced together: one shuffle pair and one barrier for both vectors of a thread.
struct BitsPair {
  uint32_t a, b;
};
__device__ __forceinline__ BitsPair shfl_xor(BitsPair v, int mask) {
  return {__shfl_xor_sync(0xffffffffu, v.a, mask), __shfl_xor_sync(0xffffffffu, v.b, mask)};
}
struct MaxBitsPair {
  __device__ __forceinline__ BitsPair operator()(BitsPair x, BitsPair y) const {
    return {x.a > y.a ? x.a : y.a, x.b > y.b ? x.b : y.b};
  }
};

__device__ __forceinline__ uint32_t max_magnitude_bits(const float* x, int count) {
  uint32_t bits = 0;
  for (int i = 0; i < count; ++i) {
    const uint32_t magnitude = __float_as_uint(x[i]) & 0x7fffffffu;
    bits = magnitude > bits ? magnitude : bits;
  }
  return bits;
}

// Codes of one vector (kVec elements starting at element `start` of in[0, n)) from its block's absmax
// pattern, packed two per byte into a kVec/2-byte word (element 2j in the high nibble of byte j).
template <typename T, QuantType kType, bool kFull>
__device__ __forceinline__ UInt<kVecElems<T> / 2> pack_codes(float (&x)[kVecElems<T>], uint32_t bits, int64_t valid,
                                                             const LaneBuckets<kType>& table, uint32_t lane) {
  constexpr int kVec = kVecElems<T>;
  constexpr int kBytes = kVec / 2;
  constexpr uint32_t kZero = kZeroCode<kType>;
  uint32_t codes[kVec];
  if (bits > kFloatMaxBits) {
#pragma unroll
    for (int i = 0; i < kVec; ++i) codes[i] = kZero;  // NaN/Inf block: codes of 0, absmax NaN
  } else {
    const BlockScale scale = block_scale(__uint_as_float(bits));
    // (x * prescale) * inv_absmax as on the CPU; x * 1 is exact, so the common case skips that multiply.
    if (scale.prescale != 1.0f) {
#pragma unroll
      for (int i = 0; i < kVec; ++i) x[i] *= scale.prescale;
    }
#pragma unroll
    for (int i = 0; i < kVec; ++i) codes[i] = code_4bit_lane<kType>(x[i] * scale.inv_absmax, table, lane);
  }
  if (!kFull && valid < kVec) {
    // The last element of an odd n leaves a low nibble holding the code of 0.0.
#pragma unroll
    for (int i = 0; i < kVec; ++i) codes[i] = i < valid ? codes[i] : kZero;
  }
  UInt<kBytes> word = 0;
#pragma unroll
  for (int j = 0; j < kBytes; ++j) {
    word |= static_cast<UInt<kBytes>>(codes[2 * j] << 4 | codes[2 * j + 1]) << (8 * j);
  }
  return word;
}

// One tile of kQuantUnroll * blockDim vectors: thread t holds vectors t and blockDim + t (both loaded before
// any arithmetic), the 2^log2_group threads of each quantization block reduce both absmax patterns at once,
// then code and store. kFull: the tile lies wholly inside in[0, n), so no load or store is masked; offsets
// inside the tile are 32-bit (a tile is at most 2 * 1024 vectors).
template <typename T, QuantType kType, bool kFull>
__device__ __forceinline__ void quantize_4bit_tile(const T* __restrict__ in, int64_t n, int64_t tile, int log2_group,
                                                   const LaneBuckets<kType>& table, BitsPair* scratch,
                                                   uint8_t* __restrict__ packed, float* __restrict__ absmax) {
  constexpr int kVec = kVecElems<T>;
  constexpr int kBytes = kVec / 2;
  const T* tile_in = in + tile * kVec;
  uint8_t* tile_packed = packed + tile * kBytes;
  const uint32_t first = threadIdx.x;
  const uint32_t second = blockDim.x + threadIdx.x;
  float x[kQuantUnroll][kVec];
  if constexpr (kFull) {
    const auto* vectors = reinterpret_cast<const AlignedArray<T, kVec>*>(tile_in);
    const AlignedArray<T, kVec> v0 = vectors[first];
    const AlignedArray<T, kVec> v1 = vectors[second];
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      x[0][i] = to_float(v0.v[i]);
      x[1][i] = to_float(v1.v[i]);
    }
  } else {
    load_floats<T, kVec>(in, (tile + first) * kVec, n, x[0]);
    load_floats<T, kVec>(in, (tile + second) * kVec, n, x[1]);
  }
  BitsPair bits{max_magnitude_bits(x[0], kVec), max_magnitude_bits(x[1], kVec)};
  bits = group_reduce(bits, 1 << log2_group, scratch, MaxBitsPair{});

  const uint32_t lane = threadIdx.x % kWarpSize;
  const uint32_t group_lane = threadIdx.x & ((1u << log2_group) - 1);
  const int64_t blocks = ceil_div(ceil_div(n, kVec), int64_t{1} << log2_group);
#pragma unroll
  for (int u = 0; u < kQuantUnroll; ++u) {
    const uint32_t local = u == 0 ? first : second;
    const uint32_t block_bits = u == 0 ? bits.a : bits.b;
    const int64_t block = (tile + local) >> log2_group;
    if (group_lane == 0 && (kFull || block < blocks)) {
      // NaN/Inf contract: the block's absmax is NaN, so all of it dequantizes to NaN.
      absmax[block] = block_bits > kFloatMaxBits ? __uint_as_float(kQuietNaNBits) : __uint_as_float(block_bits);
    }
    const int64_t valid = kFull ? kVec : n - (tile + local) * kVec;
    if (!kFull && valid <= 0) continue;
    const UInt<kBytes> word = pack_codes<T, kType, kFull>(x[u], block_bits, valid, table, lane);
    if constexpr (kFull) {
      reinterpret_cast<UInt<kBytes>*>(tile_packed)[local] = word;
    } else {
      store_word<kBytes>(packed, (tile + local) * kBytes, (valid + 1) / 2, word);
    }
  }
}

// in[n] -> packed[ceil(n/2)] (element 2j in the high nibble of byte j), absmax[ceil(n/blocksize)].
// A block of blocksize elements is covered by 2^log2_group threads (blocksize / kVec, from 4 to 1024).
template <typename T, QuantType kType>
__global__ void __launch_bounds__(kMaxThreads)
    quantize_4bit_kernel(const T* __restrict__ in, int64_t n, int log2_group, uint8_t* __restrict__ packed,
                         float* __restrict__ absmax) {
  constexpr int kVec = kVecElems<T>;
  __shared__ BitsPair scratch[2][kMaxWarps];
  __shared__ LaneBuckets<kType> table;
  fill_lane_buckets<kType>(table);
  __syncthreads();

  const int64_t full_vectors = n / kVec;
  const int64_t vectors = ceil_div(n, kVec);
  const int64_t tile_vectors = int64_t{kQuantUnroll} * blockDim.x;
  int parity = 0;
  // The loop bound and the full/partial choice depend on the tile only: every thread of the block takes the
  // same path and reaches group_reduce's barrier.
  for (int64_t tile = int64_t{blockIdx.x} * tile_vectors; tile < vectors;
       tile += int64_t{gridDim.x} * tile_vectors, parity ^= 1) {
    if (tile + tile_vectors <= full_vectors) {
      quantize_4bit_tile<T, kType, true>(in, n, tile, log2_group, table, scratch[parity], packed, absmax);
    } else {
      quantize_4bit_tile<T, kType, false>(in, n, tile, log2_group, table, scratch[parity], packed, absmax);
    }
  }
}

// The 16 decoded values, from fill_code_table (formats.h), so CPU and CUDA multiply the same fp32 table.
struct CodeTable {
  float values[16];
};

// packed[ceil(n/2)], absmax[ceil(n/blocksize)] -> out[n] = table[code] * absmax, one rounding to T.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    dequantize_4bit_kernel(const uint8_t* __restrict__ packed, const float* __restrict__ absmax, int64_t n,
                           int log2_blocksize, CodeTable table, T* __restrict__ out) {
  constexpr int kVec = kVecElems<T>;
  constexpr int kBytes = kVec / 2;
  constexpr int64_t kTile = int64_t{kThreads} * kDequantUnroll;
  __shared__ float lut[16];
  if (threadIdx.x < 16) lut[threadIdx.x] = table.values[threadIdx.x];
  __syncthreads();

  const int64_t vectors = ceil_div(n, kVec);
  const int64_t packed_bytes = ceil_div(n, 2);
  for (int64_t tile = int64_t{blockIdx.x} * kTile; tile < vectors; tile += int64_t{gridDim.x} * kTile) {
    // All loads of the tile first, then the math: kDequantUnroll independent loads in flight per thread.
    UInt<kBytes> words[kDequantUnroll];
    float scales[kDequantUnroll];
#pragma unroll
    for (int u = 0; u < kDequantUnroll; ++u) {
      const int64_t vec = tile + u * kThreads + threadIdx.x;
      words[u] = 0;
      scales[u] = 0.0f;
      if (vec < vectors) {
        words[u] = load_word<kBytes>(packed, vec * kBytes, packed_bytes);
        scales[u] = absmax[(vec * kVec) >> log2_blocksize];  // vec * kVec < n: never past the last block
      }
    }
#pragma unroll
    for (int u = 0; u < kDequantUnroll; ++u) {
      const int64_t vec = tile + u * kThreads + threadIdx.x;
      if (vec >= vectors) continue;
      float values[kVec];
      if (fabsf(scales[u]) <= FLT_MAX) {
        // finite absmax times a finite table: no NaN can arise, plain products and conversions
#pragma unroll
        for (int j = 0; j < kBytes; ++j) {
          const uint32_t byte = static_cast<uint32_t>(words[u] >> (8 * j)) & 0xffu;
          values[2 * j] = lut[byte >> 4] * scales[u];
          values[2 * j + 1] = lut[byte & 0xfu] * scales[u];
        }
        store_floats<T, kVec, false>(out, vec * kVec, n, values);
      } else {
        // NaN absmax (a non-finite block) or Inf: NaN results get the CPU's bit patterns
#pragma unroll
        for (int j = 0; j < kBytes; ++j) {
          const uint32_t byte = static_cast<uint32_t>(words[u] >> (8 * j)) & 0xffu;
          values[2 * j] = mul_like_cpu(lut[byte >> 4], scales[u]);
          values[2 * j + 1] = mul_like_cpu(lut[byte & 0xfu], scales[u]);
        }
        store_floats<T, kVec, true>(out, vec * kVec, n, values);
      }
    }
  }
}

// --- launchers (raw pointers, no torch: the emulation calls these too) ------------------------------------------

template <typename T, QuantType kType>
void launch_quantize_4bit_as(const T* in, int64_t n, int64_t blocksize, uint8_t* packed, float* absmax,
                             cudaStream_t stream) {
  constexpr int kVec = kVecElems<T>;
  const int group = static_cast<int>(blocksize / kVec);  // 4 .. 1024 threads per quantization block
  const int threads = std::max(group, kThreads);
  const auto kernel = quantize_4bit_kernel<T, kType>;
  const int64_t tiles = ceil_div(ceil_div(n, kVec), int64_t{kQuantUnroll} * threads);
  launch_kernel(kernel, grid_size(kernel, tiles, threads), threads, stream, in, n, log2_exact(group), packed, absmax);
}

// in[n] (16-byte aligned) -> packed[ceil(n/2)], absmax[ceil(n/blocksize)]; n > 0, blocksize checked.
template <typename T>
void launch_quantize_4bit(const T* in, int64_t n, int64_t blocksize, QuantType type, uint8_t* packed, float* absmax,
                          cudaStream_t stream) {
  if (type == QuantType::kNF4) {
    launch_quantize_4bit_as<T, QuantType::kNF4>(in, n, blocksize, packed, absmax, stream);
  } else {
    launch_quantize_4bit_as<T, QuantType::kFP4>(in, n, blocksize, packed, absmax, stream);
  }
}

// packed[ceil(n/2)] (16-byte aligned), absmax -> out[n] (16-byte aligned); n > 0.
template <typename T>
void launch_dequantize_4bit(const uint8_t* packed, const float* absmax, int64_t n, int64_t blocksize, QuantType type,
                            T* out, cudaStream_t stream) {
  CodeTable table;
  fill_code_table(type, table.values);
  const int64_t tiles = ceil_div(ceil_div(n, kVecElems<T>), int64_t{kThreads} * kDequantUnroll);
  const auto kernel = dequantize_4bit_kernel<T>;
  launch_kernel(kernel, grid_size(kernel, tiles, kThreads), kThreads, stream, packed, absmax, n, log2_exact(blocksize),
                table, out);
}

}  // namespace
}  // namespace bnbx::cuda

#if !defined(BNBX_CUDA_EMULATION)
// --- torch host code ---------------------------------------------------------------------------------------------
#include <torch/library.h>

#include "cuda_host.h"

namespace bnbx::cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> quantize_4bit_cuda(const at::Tensor& A, int64_t blocksize,
                                                      c10::string_view quant_type, at::ScalarType quant_storage) {
  const QuantType type = check_quantize_4bit_args(A, blocksize, quant_type, quant_storage);
  const c10::cuda::CUDAGuard guard(A.device());
  const at::Tensor input = contiguous_aligned(A);
  const int64_t n = input.numel();
  Quantize4bitOutputs outputs(input, blocksize, quant_storage);

  if (n > 0) {
    dispatch_float(input.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      launch_quantize_4bit<T>(static_cast<const T*>(input.const_data_ptr()), n, blocksize, type,
                              outputs.packed.mutable_data_ptr<uint8_t>(), outputs.absmax.mutable_data_ptr<float>(),
                              current_stream());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return outputs.result();
}

// Fills `out` (checked by the caller: shape, dtype, contiguous, on A's device) from checked arguments.
void dequantize_4bit_into(const at::Tensor& A, const at::Tensor& absmax, int64_t n, int64_t blocksize, QuantType type,
                          at::Tensor& out) {
  if (n == 0) return;
  const at::Tensor packed = contiguous_aligned(A);
  const at::Tensor stats = absmax.contiguous();
  // out may be a view at an odd offset; the kernel's 16-byte stores need an aligned buffer
  at::Tensor target = is_aligned(out.const_data_ptr(), 16) ? out : at::empty_like(out);
  dispatch_float(out.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    launch_dequantize_4bit<T>(static_cast<const uint8_t*>(packed.const_data_ptr()), stats.const_data_ptr<float>(), n,
                              blocksize, type, static_cast<T*>(target.mutable_data_ptr()), current_stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (!target.is_same(out)) out.copy_(target);
}

void dequantize_4bit_out_cuda(const at::Tensor& A, const at::Tensor& absmax, int64_t blocksize,
                              c10::string_view quant_type, at::IntArrayRef shape, at::ScalarType dtype,
                              at::Tensor& out) {
  QuantType type;
  const int64_t n = check_dequantize_4bit_args(A, absmax, blocksize, quant_type, shape, dtype, &type);
  check_dequantize_4bit_out(A, shape, dtype, out);
  const c10::cuda::CUDAGuard guard(A.device());
  dequantize_4bit_into(A, absmax, n, blocksize, type, out);
}

at::Tensor dequantize_4bit_cuda(const at::Tensor& A, const at::Tensor& absmax, int64_t blocksize,
                                c10::string_view quant_type, at::IntArrayRef shape, at::ScalarType dtype) {
  QuantType type;
  const int64_t n = check_dequantize_4bit_args(A, absmax, blocksize, quant_type, shape, dtype, &type);
  const c10::cuda::CUDAGuard guard(A.device());
  at::Tensor out = at::empty(shape, A.options().dtype(dtype));
  dequantize_4bit_into(A, absmax, n, blocksize, type, out);
  return out;
}

}  // namespace
}  // namespace bnbx::cuda

TORCH_LIBRARY_IMPL(bnbx, CUDA, m) {
  m.impl("quantize_4bit", &bnbx::cuda::quantize_4bit_cuda);
  m.impl("dequantize_4bit", &bnbx::cuda::dequantize_4bit_cuda);
  m.impl("dequantize_4bit.out", &bnbx::cuda::dequantize_4bit_out_cuda);
}
#endif  // !BNBX_CUDA_EMULATION
