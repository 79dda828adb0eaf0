// CUDA 8-bit blockwise quantize / dequantize with a sorted 256-value code (the signed dynamic map, used to
// double-quantize 4-bit absmax values): host code, then the kernels. The results are the bits of the CPU
// reference, csrc/cpu/kernels/quantize_8bit_impl.h (quantize_blockwise_generic, dequantize_blockwise_generic).
//
// The code arrives as a device tensor and is never read on the host (no synchronisation); its sortedness,
// which the binary search relies on, is checked in Python for CUDA tensors (bnbx/functional.py). Each thread
// block copies the code into shared memory once (the quantize search is bitsandbytes' CUDA rule,
// dynamic_code_index in common/rules.h), then loops over
// tiles; the block absmax uses the same integer-max reduction as the 4-bit kernel (cuda_utils.cuh).
#include "cuda_utils.cuh"

namespace bnbx::cuda {
namespace {

constexpr int kThreads = 256;  // per thread block, unless one quantization block needs more threads
constexpr int kDequantUnroll = 2;

// in[n] -> codes[n] (one byte per element), absmax[ceil(n/blocksize)]; a block of blocksize elements is
// covered by 2^log2_group threads (blocksize / kVec, from 4 to 1024).
template <typename T>
__global__ void __launch_bounds__(kMaxThreads)
    quantize_blockwise_kernel(const T* __restrict__ in, const float* __restrict__ code, int64_t n, int log2_group,
                              uint8_t* __restrict__ codes, float* __restrict__ absmax) {
  constexpr int kVec = kVecElems<T>;
  __shared__ float values[kDynamicMapSize];
  __shared__ uint32_t scratch[2][kMaxWarps];
  for (int i = threadIdx.x; i < kDynamicMapSize; i += blockDim.x) values[i] = code[i];
  __syncthreads();
  const uint32_t zero = dynamic_code_index(values, 0.0f);

  const int64_t vectors = ceil_div(n, kVec);
  const int64_t blocks = ceil_div(vectors, int64_t{1} << log2_group);
  const int lane = threadIdx.x & ((1 << log2_group) - 1);
  int parity = 0;
  // The loop bound is the same for every thread of the block: all of them reach group_reduce's barrier.
  for (int64_t tile = int64_t{blockIdx.x} * blockDim.x; tile < vectors;
       tile += int64_t{gridDim.x} * blockDim.x, parity ^= 1) {
    const int64_t vec = tile + threadIdx.x;
    const int64_t start = vec * kVec;
    float x[kVec];
    const uint32_t bits = load_block_absmax_bits<T, kVec>(in, n, vec, log2_group, scratch[parity], x);
    const bool nonfinite = bits > kFloatMaxBits;
    const int64_t block = vec >> log2_group;
    if (lane == 0 && block < blocks) {
      absmax[block] = nonfinite ? __uint_as_float(kQuietNaNBits) : __uint_as_float(bits);
    }
    if (start >= n) continue;

    UInt<kVec> word = 0;
    if (nonfinite) {
#pragma unroll
      for (int i = 0; i < kVec; ++i) word |= static_cast<UInt<kVec>>(zero) << (8 * i);
    } else {
      const BlockScale scale = block_scale(__uint_as_float(bits));
      // (x * prescale) * inv_absmax as on the CPU; x * 1 is exact, so the common case skips that multiply.
      if (scale.prescale != 1.0f) {
#pragma unroll
        for (int i = 0; i < kVec; ++i) x[i] *= scale.prescale;
      }
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        word |= static_cast<UInt<kVec>>(dynamic_code_index(values, x[i] * scale.inv_absmax)) << (8 * i);
      }
    }
    store_word<kVec>(codes, start, n - start, word);
  }
}

// codes[n], absmax[ceil(n/blocksize)] -> out[n] = code[codes[i]] * absmax, one rounding to T.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    dequantize_blockwise_kernel(const uint8_t* __restrict__ codes, const float* __restrict__ absmax,
                                const float* __restrict__ code, int64_t n, int log2_blocksize, T* __restrict__ out) {
  constexpr int kVec = kVecElems<T>;
  constexpr int64_t kTile = int64_t{kThreads} * kDequantUnroll;
  __shared__ float values[kDynamicMapSize];
  for (int i = threadIdx.x; i < kDynamicMapSize; i += blockDim.x) values[i] = code[i];
  __syncthreads();

  const int64_t vectors = ceil_div(n, kVec);
  for (int64_t tile = int64_t{blockIdx.x} * kTile; tile < vectors; tile += int64_t{gridDim.x} * kTile) {
    // All loads of the tile first, then the math: kDequantUnroll independent loads in flight per thread.
    UInt<kVec> words[kDequantUnroll];
    float scales[kDequantUnroll];
#pragma unroll
    for (int u = 0; u < kDequantUnroll; ++u) {
      const int64_t vec = tile + u * kThreads + threadIdx.x;
      words[u] = 0;
      scales[u] = 0.0f;
      if (vec < vectors) {
        words[u] = load_word<kVec>(codes, vec * kVec, n);
        scales[u] = absmax[(vec * kVec) >> log2_blocksize];  // vec * kVec < n: never past the last block
      }
    }
#pragma unroll
    for (int u = 0; u < kDequantUnroll; ++u) {
      const int64_t vec = tile + u * kThreads + threadIdx.x;
      if (vec >= vectors) continue;
      float result[kVec];
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        result[i] = mul_like_cpu(values[static_cast<uint32_t>(words[u] >> (8 * i)) & 0xffu], scales[u]);
      }
      store_floats<T, kVec>(out, vec * kVec, n, result);
    }
  }
}

// --- launchers (raw pointers, no torch: the emulation calls these too) ------------------------------------------

// in[n] (16-byte aligned), code[256] -> codes[n], absmax[ceil(n/blocksize)]; n > 0, blocksize checked.
template <typename T>
void launch_quantize_blockwise(const T* in, const float* code, int64_t n, int64_t blocksize, uint8_t* codes,
                               float* absmax, cudaStream_t stream) {
  constexpr int kVec = kVecElems<T>;
  const int group = static_cast<int>(blocksize / kVec);  // 4 .. 1024 threads per quantization block
  const int threads = std::max(group, kThreads);
  const auto kernel = quantize_blockwise_kernel<T>;
  launch_kernel(kernel, grid_size(kernel, ceil_div(ceil_div(n, kVec), threads), threads), threads, stream, in, code, n,
                log2_exact(group), codes, absmax);
}

// codes[n] (16-byte aligned), absmax, code[256] -> out[n] (16-byte aligned); n > 0.
template <typename T>
void launch_dequantize_blockwise(const uint8_t* codes, const float* absmax, const float* code, int64_t n,
                                 int64_t blocksize, T* out, cudaStream_t stream) {
  const int64_t tiles = ceil_div(ceil_div(n, kVecElems<T>), int64_t{kThreads} * kDequantUnroll);
  const auto kernel = dequantize_blockwise_kernel<T>;
  launch_kernel(kernel, grid_size(kernel, tiles, kThreads), kThreads, stream, codes, absmax, code, n,
                log2_exact(blocksize), out);
}

}  // namespace
}  // namespace bnbx::cuda

#if !defined(BNBX_CUDA_EMULATION)
// --- torch host code ---------------------------------------------------------------------------------------------
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cuda_host.h"

namespace bnbx::cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> quantize_blockwise_cuda(const at::Tensor& A, const at::Tensor& code,
                                                           int64_t blocksize) {
  check_quantize_blockwise_args(A, code, blocksize);
  // one thread group covers a block (at most 1024 threads): larger blocks are CPU-only for now
  TORCH_CHECK_VALUE(blocksize <= kMaxBlocksize, "quantize_blockwise: blocksize above ", kMaxBlocksize,
                    " is supported on the CPU only, got ", blocksize);
  const c10::cuda::CUDAGuard guard(A.device());
  const at::Tensor input = contiguous_aligned(A);
  const at::Tensor code_values = code.contiguous();
  const int64_t n = input.numel();
  at::Tensor out = at::empty(input.sizes(), input.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({ceil_div(n, blocksize)}, input.options().dtype(at::kFloat));
  if (n == 0) return {out, absmax};

  dispatch_float(input.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    launch_quantize_blockwise<T>(static_cast<const T*>(input.const_data_ptr()), code_values.const_data_ptr<float>(), n,
                                 blocksize, out.mutable_data_ptr<uint8_t>(), absmax.mutable_data_ptr<float>(),
                                 current_stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, absmax};
}

at::Tensor dequantize_blockwise_cuda(const at::Tensor& A, const at::Tensor& absmax, const at::Tensor& code,
                                     int64_t blocksize, at::ScalarType dtype) {
  check_dequantize_blockwise_args(A, absmax, code, blocksize, dtype);
  const c10::cuda::CUDAGuard guard(A.device());
  const at::Tensor codes = contiguous_aligned(A);
  const at::Tensor stats = absmax.contiguous();
  const at::Tensor code_values = code.contiguous();
  const int64_t n = codes.numel();
  at::Tensor out = at::empty(codes.sizes(), codes.options().dtype(dtype));
  if (n == 0) return out;

  dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    launch_dequantize_blockwise<T>(codes.const_data_ptr<uint8_t>(), stats.const_data_ptr<float>(),
                                   code_values.const_data_ptr<float>(), n, blocksize,
                                   static_cast<T*>(out.mutable_data_ptr()), current_stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// Double quantization: a few ATen reductions for the offset (on the GPU they cost microseconds; the fused
// op matters on the CPU), then the kernel above. The offset is double_quantize_offset's rule (rules.h): the
// mean of the non-NaN values accumulated in double, rounded once to fp32, NaN -> 0, +-Inf -> +-FLT_MAX.
std::tuple<at::Tensor, at::Tensor, at::Tensor> double_quantize_cuda(const at::Tensor& absmax, const at::Tensor& code,
                                                                    int64_t blocksize) {
  check_double_quantize_args(absmax, code, blocksize);
  const c10::cuda::CUDAGuard guard(absmax.device());
  const at::Tensor values = absmax.contiguous();
  const at::Tensor valid = at::logical_not(at::isnan(values));
  const at::Tensor sum = at::where(valid, values.to(at::kDouble), 0.0).sum();
  const at::Tensor mean = at::div(sum, valid.sum()).to(at::kFloat);  // 0 / 0 = NaN when nothing is valid
  const at::Tensor offset = at::nan_to_num(mean, 0.0);
  auto [codes, absmax2] = quantize_blockwise_cuda(at::sub(values, offset), code, blocksize);
  return {codes, absmax2, offset};
}

}  // namespace
}  // namespace bnbx::cuda

TORCH_LIBRARY_IMPL(bnbx, CUDA, m) {
  m.impl("quantize_blockwise", &bnbx::cuda::quantize_blockwise_cuda);
  m.impl("dequantize_blockwise", &bnbx::cuda::dequantize_blockwise_cuda);
  m.impl("double_quantize", &bnbx::cuda::double_quantize_cuda);
}
#endif  // !BNBX_CUDA_EMULATION
