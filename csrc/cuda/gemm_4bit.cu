// CUDA gemm_4bit: out [M, N] = A [M, K] @ W^T + bias with W [N, K] the packed 4-bit weight.
// - M <= kGemvMaxRows: gemv_4bit_kernel, one warp per row of W reading the packed bytes directly (16 bytes =
//   32 codes per lane per step when K % 32 == 0, 4 bytes when K % 8 == 0, else one code at a time), the block
//   scale decoded in the kernel (double quantization: nested_code[q] * nested_absmax[b >> shift] + offset, the
//   CPU's fp32 arithmetic), fp32 accumulation for up to 8 rows of A at once, a warp-shuffle sum, bias, one rounding.
// - fp16/bf16 A with kGemvMaxRows < M <= tiles_max_rows(): gemm_4bit_tiles_kernel, tensor cores (wmma) on
//   tiles of W dequantized into shared memory, so the weight is read once per 64 rows of A as packed bytes
//   and never written out whole; K split across thread blocks where the tiles alone are too few (plan_tiles).
// - larger M, or fp32 A: the weight dequantized in A's dtype (the dequantize_4bit kernel) and at::mm (cuBLAS),
//   as bitsandbytes does.
// The CPU host code (csrc/cpu/gemm_4bit.cpp) is the reference for the results.
//
// The kernels and their torch-free launchers come first; csrc/cuda/emulation/emu_gemm_4bit.cpp runs them on the
// CPU in the tests. The torch host code follows (not emulated; at::mm is cuBLAS).
#include "cuda_utils.cuh"

#if defined(BNBX_CUDA_EMULATION)
#include "emulation/wmma_shim.h"
#else
#include <mma.h>
#endif

namespace bnbx::cuda {
namespace {

constexpr int kGemvMaxRows = 8;
constexpr int kGemvWarps = 8;  // rows of W per thread block

struct CodeValues {
  float v[16];
};

struct Scales {
  const float* absmax;         // fp32 [blocks], or nullptr when nested
  const uint8_t* absmax_q;     // uint8 [blocks] when nested
  const float* nested_absmax;  // fp32 [ceil(blocks / nested_blocksize)]
  const float* nested_code;    // fp32 [256]
  const float* offset;         // fp32 [1]
  int nested_shift;            // log2(nested_blocksize)
};

__device__ __forceinline__ float block_scale(const Scales& s, int64_t block) {
  if (s.absmax != nullptr) return s.absmax[block];
  const float scaled = s.nested_code[s.absmax_q[block]] * s.nested_absmax[block >> s.nested_shift];
  return scaled + *s.offset;
}

// The table values of the 8 codes of a 4-byte word (little endian: byte j holds elements 2j in its high
// nibble and 2j + 1 in its low one).
__device__ __forceinline__ void decode_8(uint32_t word, const float* __restrict__ table, float (&w)[8]) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const uint32_t byte = (word >> (8 * j)) & 0xffu;
    w[2 * j] = table[byte >> 4];
    w[2 * j + 1] = table[byte & 0x0fu];
  }
}

// acc[m] += scale * the sum over j < 8 of code(word, j) * A[m, k + j]: 8 codes of one block, summed before the
// block's scale is applied.
template <typename T>
__device__ __forceinline__ void gemv_accumulate_8(uint32_t word, float scale, const CodeValues& codes,
                                                  const T* __restrict__ A, int M, int64_t K, int64_t k,
                                                  float (&acc)[kGemvMaxRows]) {
  float w[8];
  decode_8(word, codes.v, w);
#pragma unroll
  for (int m = 0; m < kGemvMaxRows; ++m) {
    if (m < M) {
      float sum = 0.0f;
#pragma unroll
      for (int j = 0; j < 8; ++j) sum += w[j] * to_float(A[m * K + k + j]);
      acc[m] += sum * scale;
    }
  }
}

template <typename T>
__global__ void gemv_4bit_kernel(const T* __restrict__ A,        // [M, K]
                                 const uint8_t* __restrict__ W,  // packed [ceil(N * K / 2)], 16-byte aligned
                                 Scales scales, CodeValues codes, const T* __restrict__ bias,  // [N] or nullptr
                                 int M, int64_t K, int64_t N, int shift,  // shift = log2(blocksize)
                                 T* __restrict__ out) {                   // [M, N]
  const int lane = threadIdx.x % kWarpSize;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kGemvWarps + threadIdx.x / kWarpSize;
  if (n >= N) return;
  float acc[kGemvMaxRows];
#pragma unroll
  for (int m = 0; m < kGemvMaxRows; ++m) acc[m] = 0.0f;
  const int64_t row = n * K;  // first element of row n in the flattened weight
  if (K % 32 == 0) {
    // 32 elements (16 bytes, 16-byte aligned as row / 2 is a multiple of 16) per lane per step, all in one
    // block (blocksizes are powers of two >= 32): 4x the bytes in flight of the 4-byte loads, which bound a
    // GEMV's speed on a GPU
    const uint4* vectors = reinterpret_cast<const uint4*>(W + row / 2);
    for (int64_t k = 32 * lane; k < K; k += 32 * kWarpSize) {
      const uint4 q = __ldg(vectors + k / 32);
      const float scale = block_scale(scales, (row + k) >> shift);
      gemv_accumulate_8(q.x, scale, codes, A, M, K, k, acc);
      gemv_accumulate_8(q.y, scale, codes, A, M, K, k + 8, acc);
      gemv_accumulate_8(q.z, scale, codes, A, M, K, k + 16, acc);
      gemv_accumulate_8(q.w, scale, codes, A, M, K, k + 24, acc);
    }
  } else if (K % 8 == 0) {
    // 8 elements (4 bytes, 4-byte aligned since row * 2 / 4 bytes is whole) per lane per step, all in one block
    const uint32_t* words = reinterpret_cast<const uint32_t*>(W + row / 2);
    for (int64_t k = 8 * lane; k < K; k += 8 * kWarpSize) {
      gemv_accumulate_8(__ldg(words + k / 8), block_scale(scales, (row + k) >> shift), codes, A, M, K, k, acc);
    }
  } else {
    for (int64_t k = lane; k < K; k += kWarpSize) {
      const int64_t e = row + k;
      const uint8_t byte = W[e >> 1];
      const float w = codes.v[(e & 1) ? (byte & 0x0f) : (byte >> 4)] * block_scale(scales, e >> shift);
#pragma unroll
      for (int m = 0; m < kGemvMaxRows; ++m)
        if (m < M) acc[m] += w * to_float(A[m * K + k]);
    }
  }
#pragma unroll
  for (int m = 0; m < kGemvMaxRows; ++m) {
    float v = acc[m];
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
    if (lane == 0 && m < M) {
      if (bias != nullptr) v += to_float(bias[n]);
      out[m * N + n] = from_float<T>(v);
    }
  }
}

// --- tensor-core tiles (fp16/bf16, M > kGemvMaxRows) ---------------------------------------------------------
// One thread block computes a kTileM x kTileN tile of out. Per step of kTileK along K it stages the rows of A
// and the dequantized rows of W (the dequantize_4bit kernel's values: code * scale rounded once to T) in
// shared memory, zero past M, N and K, and its 4 warps multiply them with 16x16x16 wmma products, warp w
// owning columns 16w..16w+15 of the tile. The fp32 sums meet the bias before the one rounding to T.
constexpr int kTileN = 64;
constexpr int kTileK = 64;
constexpr int kTileWarps = kTileN / 16;
constexpr int kTileThreads = kTileWarps * kWarpSize;
constexpr int kTileLd = kTileK + 8;    // shared row stride in elements: 16 bytes of padding spread rows over banks
constexpr int kOutLd = kTileN + 4;     // fp32 row stride of the output staging tile
constexpr int64_t kTilesMaxRows = 64;  // default largest M for the tiles (tiles_max_rows); above, dequantize + cuBLAS

// W[n, k0 + c .. + 7] dequantized into w[8] (zeros past N and K). words: K % 8 == 0, so the 8 codes are one
// aligned 4-byte word and one block (blocksizes are powers of two >= 32).
__device__ __forceinline__ void dequantize_8(const uint8_t* __restrict__ W, const Scales& scales,
                                             const float* __restrict__ codes, int64_t n, int64_t k, int64_t N,
                                             int64_t K, int shift, bool words, float (&w)[8]) {
#pragma unroll
  for (int j = 0; j < 8; ++j) w[j] = 0.0f;
  if (n >= N || k >= K) return;
  const int64_t e = n * K + k;  // flat index of the first element
  if (words) {
    const float scale = block_scale(scales, e >> shift);
    decode_8(__ldg(reinterpret_cast<const uint32_t*>(W) + e / 8), codes, w);
#pragma unroll
    for (int j = 0; j < 8; ++j) w[j] = mul_like_cpu(w[j], scale);
    return;
  }
  for (int j = 0; j < 8 && k + j < K; ++j) {
    const uint8_t byte = W[(e + j) >> 1];
    const uint32_t nibble = ((e + j) & 1) ? (byte & 0x0fu) : (byte >> 4);
    w[j] = mul_like_cpu(codes[nibble], block_scale(scales, (e + j) >> shift));
  }
}

template <typename T, int kTileM>
__global__ void __launch_bounds__(kTileThreads)
    gemm_4bit_tiles_kernel(const T* __restrict__ A,                                      // [M, K]
                           const uint8_t* __restrict__ W,                                // packed [ceil(N * K / 2)]
                           Scales scales, CodeValues codes, const T* __restrict__ bias,  // [N] or nullptr
                           int64_t M, int64_t K, int64_t N, int shift, int64_t k_per_split,
                           float* __restrict__ partial,  // [splits, M, N] fp32 sums, or nullptr: one split
                           T* __restrict__ out) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // bf16 wmma needs sm_80; the host sends older GPUs to dequantize + cuBLAS
#else
  namespace wmma = nvcuda::wmma;
  constexpr int kFragsM = kTileM / 16;
  __shared__ __align__(32) T a_tile[kTileM * kTileLd];
  __shared__ __align__(32) T w_tile[kTileN * kTileLd];
  __shared__ __align__(32) float out_tile[kTileM * kOutLd];
  __shared__ float code_table[16];  // indexed by the codes: in shared memory rather than a local-memory copy
  if (threadIdx.x == 0) {
#pragma unroll
    for (int j = 0; j < 16; ++j) code_table[j] = codes.v[j];  // constant indices: no local-memory copy
  }
  __syncthreads();
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kTileM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kTileN;
  const bool words = K % 8 == 0;                      // W: 8 codes per aligned 4-byte word
  const bool a_vectors = words && is_aligned(A, 16);  // A: rows of whole 16-byte vectors
  const T zero = from_float<T>(0.0f);

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kFragsM];
#pragma unroll
  for (int f = 0; f < kFragsM; ++f) wmma::fill_fragment(acc[f], 0.0f);

  // this block's slice of K: whole steps of kTileK, so a step never straddles two slices
  const int64_t k_end = std::min(K, (static_cast<int64_t>(blockIdx.z) + 1) * k_per_split);
  for (int64_t k0 = static_cast<int64_t>(blockIdx.z) * k_per_split; k0 < k_end; k0 += kTileK) {
    if (a_vectors) {  // 8 elements (16 bytes) at a time
      for (int i = threadIdx.x; i < kTileM * (kTileK / 8); i += kTileThreads) {
        const int r = i / (kTileK / 8), c = 8 * (i % (kTileK / 8));
        const int64_t m = m0 + r, k = k0 + c;
        AlignedArray<T, 8> v;
        if (m < M && k < K) {
          v = *reinterpret_cast<const AlignedArray<T, 8>*>(A + m * K + k);
        } else {
#pragma unroll
          for (int j = 0; j < 8; ++j) v.v[j] = zero;
        }
        *reinterpret_cast<AlignedArray<T, 8>*>(a_tile + r * kTileLd + c) = v;
      }
    } else {
      for (int i = threadIdx.x; i < kTileM * kTileK; i += kTileThreads) {
        const int r = i / kTileK, c = i % kTileK;
        const int64_t m = m0 + r, k = k0 + c;
        a_tile[r * kTileLd + c] = m < M && k < K ? A[m * K + k] : zero;
      }
    }
    for (int i = threadIdx.x; i < kTileN * (kTileK / 8); i += kTileThreads) {
      const int r = i / (kTileK / 8), c = 8 * (i % (kTileK / 8));
      float w[8];
      dequantize_8(W, scales, code_table, n0 + r, k0 + c, N, K, shift, words, w);
      // 16-byte aligned: rows are 144 bytes apart and c is a multiple of 8 elements
      *reinterpret_cast<AlignedArray<T, 8>*>(w_tile + r * kTileLd + c) = convert_floats<T, 8, true>(w);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTileK; kk += 16) {
      // B = W^T [K, N] column-major is W's tile [N, K] row-major
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
      wmma::load_matrix_sync(b, w_tile + warp * 16 * kTileLd + kk, kTileLd);
#pragma unroll
      for (int f = 0; f < kFragsM; ++f) {
        if (m0 + 16 * f >= M) break;  // the same in every lane of the block
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::load_matrix_sync(a, a_tile + f * 16 * kTileLd + kk, kTileLd);
        wmma::mma_sync(acc[f], a, b, acc[f]);
      }
    }
    __syncthreads();
  }

#pragma unroll
  for (int f = 0; f < kFragsM; ++f) {
    wmma::store_matrix_sync(out_tile + f * 16 * kOutLd + warp * 16, acc[f], kOutLd, wmma::mem_row_major);
  }
  __syncthreads();
  for (int i = threadIdx.x; i < kTileM * kTileN; i += kTileThreads) {
    const int r = i / kTileN, c = i % kTileN;
    const int64_t m = m0 + r, n = n0 + c;
    if (m < M && n < N) {
      float v = out_tile[r * kOutLd + c];
      if (partial != nullptr) {
        partial[(static_cast<int64_t>(blockIdx.z) * M + m) * N + n] = v;
      } else {
        if (bias != nullptr) v += to_float(bias[n]);
        out[m * N + n] = from_float<T>(v);
      }
    }
  }
#endif
}

// out = the sum of the splits' fp32 partial sums, in split order (deterministic), + bias, rounded once.
template <typename T>
__global__ void gemm_4bit_split_sum_kernel(const float* __restrict__ partial, int splits, const T* __restrict__ bias,
                                           int64_t M, int64_t N, T* __restrict__ out) {
  const int64_t size = M * N;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < size; i += int64_t(gridDim.x) * blockDim.x) {
    float v = partial[i];
    for (int z = 1; z < splits; ++z) v += partial[z * size + i];
    if (bias != nullptr) v += to_float(bias[i % N]);
    out[i] = from_float<T>(v);
  }
}

template <typename T, int kTileM>
constexpr auto tiles_kernel = gemm_4bit_tiles_kernel<T, kTileM>;

// How the tiles split K. A 4-bit weight is read once, so at small M the kernel is bound by how many bytes are
// in flight: one step of 64 columns of K per tile is only 32 bytes per row of W. When the tiles alone leave
// the GPU's resident blocks idle, K is split into up to that many slices (each at least 4 steps, so the
// extra fp32 partial sums stay small against the weight), summed afterwards in a fixed order.
struct TilesPlan {
  int64_t splits = 1;
  int64_t k_per_split = 0;       // a multiple of kTileK
  int64_t workspace_floats = 0;  // the split sums, splits * M * N fp32 (0: one split, none needed)
};

template <typename T>
TilesPlan plan_tiles(int64_t M, int64_t K, int64_t N) {
  const int64_t tiles = ceil_div(N, int64_t{kTileN}) * (M <= 16 ? 1 : ceil_div(M, int64_t{64}));
  const int64_t resident =
      M <= 16 ? resident_blocks(tiles_kernel<T, 16>, kTileThreads) : resident_blocks(tiles_kernel<T, 64>, kTileThreads);
  const int64_t steps = ceil_div(K, int64_t{kTileK});
  const int64_t wanted = std::max<int64_t>(1, std::min(ceil_div(resident, tiles), steps / 4));
  TilesPlan plan;
  plan.k_per_split = std::max<int64_t>(1, ceil_div(steps, wanted)) * kTileK;
  plan.splits = std::max<int64_t>(1, ceil_div(K, plan.k_per_split));
  plan.workspace_floats = plan.splits > 1 ? plan.splits * M * N : 0;
  return plan;
}

// out[M, N] = A[M, K] @ W^T (+ bias) for M >= 1, K >= 1 and T fp16 or bf16, on tensor cores; W packed as
// bitsandbytes lays it out, 4-byte aligned. Tiles of 16 rows of A up to M = 16, of 64 above. `plan` is
// plan_tiles<T>(M, K, N), and `workspace` holds its workspace_floats floats (nullptr when that is 0).
template <typename T>
void launch_gemm_4bit_tiles(const T* A, const uint8_t* W, const Scales& scales, QuantType type, const T* bias,
                            int64_t M, int64_t K, int64_t N, int64_t blocksize, const TilesPlan& plan, float* workspace,
                            T* out, cudaStream_t stream) {
  static_assert(!std::is_same_v<T, float>, "the tiles multiply fp16 or bf16");
  if (M == 0 || N == 0) return;
  BNBX_CUDA_ASSERT(K >= 1 && ceil_div(M, int64_t{64}) <= 65535, "gemm_4bit_tiles: M or K out of range");
  BNBX_CUDA_ASSERT(K % 8 != 0 || is_aligned(W, 4), "gemm_4bit_tiles: packed weight not 4-byte aligned");
  BNBX_CUDA_ASSERT(plan.splits <= 65535 && (plan.splits == 1 || workspace != nullptr),
                   "gemm_4bit_tiles: no workspace for the split sums");
  float* partial = plan.splits > 1 ? workspace : nullptr;
  CodeValues codes;
  fill_code_table(type, codes.v);
  const unsigned int grid_n = static_cast<unsigned int>(ceil_div(N, int64_t{kTileN}));
  const unsigned int splits = static_cast<unsigned int>(plan.splits);
  const int shift = log2_exact(blocksize);
  if (M <= 16) {
    launch_kernel(tiles_kernel<T, 16>, dim3(grid_n, 1, splits), kTileThreads, stream, A, W, scales, codes, bias, M, K,
                  N, shift, plan.k_per_split, partial, out);
  } else {
    const unsigned int grid_m = static_cast<unsigned int>(ceil_div(M, int64_t{64}));
    launch_kernel(tiles_kernel<T, 64>, dim3(grid_n, grid_m, splits), kTileThreads, stream, A, W, scales, codes, bias, M,
                  K, N, shift, plan.k_per_split, partial, out);
  }
  if (partial != nullptr) {
    constexpr int kSumThreads = 256;
    const auto sum = gemm_4bit_split_sum_kernel<T>;
    launch_kernel(sum, grid_size(sum, ceil_div(M * N, int64_t{kSumThreads}), kSumThreads), kSumThreads, stream, partial,
                  static_cast<int>(plan.splits), bias, M, N, out);
  }
}

// The fp32 block scales [blocks] of a double-quantized weight, for the dequantize-then-mm path (large M).
__global__ void decode_absmax_kernel(Scales scales, int64_t blocks, float* __restrict__ out) {
  for (int64_t b = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; b < blocks; b += int64_t(gridDim.x) * blockDim.x) {
    out[b] = block_scale(scales, b);
  }
}

constexpr int kDecodeThreads = 256;

void launch_decode_absmax(const Scales& scales, int64_t blocks, float* out, cudaStream_t stream) {
  if (blocks == 0) return;
  auto kernel = decode_absmax_kernel;
  launch_kernel(kernel, grid_size(kernel, ceil_div(blocks, int64_t{kDecodeThreads}), kDecodeThreads), kDecodeThreads,
                stream, scales, blocks, out);
}

// out[M, N] = A[M, K] @ W^T (+ bias) for 1 <= M <= kGemvMaxRows, K >= 1; W packed as bitsandbytes lays it out,
// 16-byte aligned (K % 32 == 0 loads 16 bytes at a time, K % 8 == 0 4 bytes).
template <typename T>
void launch_gemv_4bit(const T* A, const uint8_t* W, const Scales& scales, QuantType type, const T* bias, int64_t M,
                      int64_t K, int64_t N, int64_t blocksize, T* out, cudaStream_t stream) {
  if (N == 0) return;
  BNBX_CUDA_ASSERT(M >= 1 && M <= kGemvMaxRows && K >= 1, "gemv_4bit: M out of range");
  BNBX_CUDA_ASSERT(K % 8 != 0 || is_aligned(W, 16), "gemv_4bit: packed weight not 16-byte aligned");
  CodeValues codes;
  fill_code_table(type, codes.v);
  const unsigned int grid = static_cast<unsigned int>(ceil_div(N, int64_t{kGemvWarps}));
  launch_kernel(gemv_4bit_kernel<T>, grid, kGemvWarps * kWarpSize, stream, A, W, scales, codes, bias,
                static_cast<int>(M), K, N, log2_exact(blocksize), out);
}

}  // namespace
}  // namespace bnbx::cuda

#if !defined(BNBX_CUDA_EMULATION)
#include <ATen/ops/add.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cstdlib>

#include "../common/checks_gemm_4bit.h"
#include "cuda_host.h"

namespace bnbx::cuda {
namespace {

// The largest M that goes to the tensor-core tiles; BNBX_CUDA_GEMM_4BIT_TILES_MAX_M overrides it (read per
// call, so a benchmark can compare both paths in one process; 0 sends every M > kGemvMaxRows to cuBLAS).
int64_t tiles_max_rows() {
  if (const char* value = std::getenv("BNBX_CUDA_GEMM_4BIT_TILES_MAX_M")) {
    return std::min<int64_t>(std::atoll(value), int64_t{65535} * 64);
  }
  return kTilesMaxRows;
}

int compute_capability_major(int device) {
  int major = 0;
  BNBX_CUDA_CALL(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  return major;
}

at::Tensor gemm_4bit_cuda(const at::Tensor& A, const at::Tensor& B, const at::Tensor& absmax, int64_t blocksize,
                          c10::string_view quant_type, at::IntArrayRef shape, const std::optional<at::Tensor>& bias,
                          const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& nested_code,
                          const std::optional<at::Tensor>& nested_offset, int64_t nested_blocksize) {
  const Gemm4bitArgs args = check_gemm_4bit_args(A, B, absmax, blocksize, quant_type, shape, bias, nested_absmax,
                                                 nested_code, nested_offset, nested_blocksize);
  const c10::cuda::CUDAGuard guard(A.device());
  const int64_t N = args.N, K = args.K;
  const std::vector<int64_t> out_shape = gemm_4bit_out_shape(A, N);
  const int64_t M = c10::multiply_integers(A.sizes().begin(), A.sizes().end() - 1);
  if (M == 0 || N == 0) return at::empty(out_shape, A.options());
  if (K == 0) {
    at::Tensor out = at::zeros({M, N}, A.options());
    if (bias.has_value()) out.add_(*bias);
    return out.view(out_shape);
  }
  const at::Tensor a2 = A.reshape({M, K}).contiguous();
  const at::Tensor packed = contiguous_aligned(B);  // 4-byte loads of codes
  const at::Tensor stats = absmax.contiguous();

  Scales scales{};
  at::Tensor nested_stats, nested_table, offset;
  if (args.nested) {
    nested_stats = nested_absmax->contiguous();
    nested_table = nested_code->contiguous();
    offset = nested_offset->reshape({1}).contiguous();
    scales.absmax_q = stats.const_data_ptr<uint8_t>();
    scales.nested_absmax = nested_stats.const_data_ptr<float>();
    scales.nested_code = nested_table.const_data_ptr<float>();
    scales.offset = offset.const_data_ptr<float>();
    scales.nested_shift = log2_exact(nested_blocksize);
  } else {
    scales.absmax = stats.const_data_ptr<float>();
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();

  if (M > kGemvMaxRows && A.scalar_type() != at::kFloat && M <= tiles_max_rows() &&
      compute_capability_major(A.get_device()) >= 8) {
    at::Tensor out = at::empty({M, N}, A.options());
    dispatch_float(A.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      if constexpr (!std::is_same_v<T, float>) {
        // the split-K partial sums (stream-ordered caching allocator: no synchronisation)
        const TilesPlan plan = plan_tiles<T>(M, K, N);
        const at::Tensor workspace = at::empty({plan.workspace_floats}, A.options().dtype(at::kFloat));
        launch_gemm_4bit_tiles<T>(
            static_cast<const T*>(a2.const_data_ptr()), static_cast<const uint8_t*>(packed.const_data_ptr()), scales,
            args.type, bias.has_value() ? static_cast<const T*>(bias_c.const_data_ptr()) : nullptr, M, K, N, blocksize,
            plan, workspace.numel() > 0 ? workspace.mutable_data_ptr<float>() : nullptr,
            static_cast<T*>(out.mutable_data_ptr()), stream);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
    return out.view(out_shape);
  }

  if (M > kGemvMaxRows) {
    at::Tensor decoded = stats;
    if (args.nested) {
      // the CPU's arithmetic: code[q] * nested_absmax[block / nested_blocksize], then + offset
      decoded = at::empty({args.blocks}, stats.options().dtype(at::kFloat));
      launch_decode_absmax(scales, args.blocks, decoded.mutable_data_ptr<float>(), stream);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    static const auto dequantize = c10::Dispatcher::singleton()
                                       .findSchemaOrThrow("bnbx::dequantize_4bit", "")
                                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t,
                                                         c10::string_view, at::IntArrayRef, at::ScalarType)>();
    const at::Tensor weight = dequantize.call(packed, decoded, blocksize, quant_type, {N, K}, A.scalar_type());
    // the bias joins the fp32 sums before the one rounding, as in F.linear (addmm)
    const at::Tensor out = bias.has_value() ? at::addmm(*bias, a2, weight.t()) : at::mm(a2, weight.t());
    return out.view(out_shape);
  }

  at::Tensor out = at::empty({M, N}, A.options());
  dispatch_float(A.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    launch_gemv_4bit<T>(static_cast<const T*>(a2.const_data_ptr()),
                        static_cast<const uint8_t*>(packed.const_data_ptr()), scales, args.type,
                        bias.has_value() ? static_cast<const T*>(bias_c.const_data_ptr()) : nullptr, M, K, N, blocksize,
                        static_cast<T*>(out.mutable_data_ptr()), stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out.view(out_shape);
}

}  // namespace
}  // namespace bnbx::cuda

TORCH_LIBRARY_IMPL(bnbx, CUDA, m) { m.impl("gemm_4bit", &bnbx::cuda::gemm_4bit_cuda); }
#endif  // !BNBX_CUDA_EMULATION
