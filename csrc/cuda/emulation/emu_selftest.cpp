// Kernels that check the emulator itself: one correct block reduction, and three that break CUDA's rules
// (a barrier some threads skip by exiting, a shuffle with exited lanes, a warp split between a shuffle and
// a barrier, a barrier that some threads reach as __syncthreads_or and others as __syncthreads).
// tests/test_cuda_emulation.py expects the first to pass and the others to be reported. The same for the warp
// matrix functions (wmma_shim.h): one correct 16x16x16 product, and calls CUDA leaves undefined.
#include <vector>

#include "emulator.h"
#include "wmma_shim.h"

namespace {

__global__ void reduce_kernel(const uint32_t* in, uint32_t* out, int mode) {
  __shared__ uint32_t partial[32];
  const unsigned int t = threadIdx.x;
  if (mode == 3 && t % 32 == 3) __syncthreads();  // one lane waits at a barrier, its warp at a shuffle
  uint32_t v = in[blockIdx.x * blockDim.x + t];
  if (mode == 2 && t % 32 >= 16) return;  // half the warp leaves before the shuffle
  for (int mask = 16; mask > 0; mask /= 2) v += __shfl_xor_sync(0xffffffffu, v, mask);
  if (mode == 1 && t == 5) return;  // exits before the barrier below
  if (t % 32 == 0) partial[t / 32] = v;
  __syncthreads();
  // bar.red.or: every thread gets the block's OR, and a later barrier starts from a clear predicate
  const int any = __syncthreads_or(t == 77);
  const int none = mode == 4 && t % 2 ? (__syncthreads(), 0) : __syncthreads_or(0);
  if (any != 1 || none != 0) out[blockIdx.x] = 0xdeadu;
  if (any != 1 || none != 0) return;
  if (t == 0) {
    uint32_t sum = 0;
    for (unsigned int w = 0; w < blockDim.x / 32; ++w) sum += partial[w];
    out[blockIdx.x] = sum;
  }
}

// One warp: D = A @ B with A [16, 16] row-major and B [16, 16] column-major in shared memory (__half), D stored
// row-major as fp32 (through shared memory). mode 1: one lane passes another pointer; 2: a tile 16 bytes off a 256-bit
// boundary; 3: a stride of 20 halves (40 bytes); 4: lane 7 leaves before the product.
__global__ void wmma_kernel(const float* a, const float* b, float* d, int mode) {
  namespace wmma = nvcuda::wmma;
  __shared__ __align__(32) __half tiles[2 * 16 * 32 + 16];
  const int lane = static_cast<int>(threadIdx.x);
  const int ld = mode == 3 ? 20 : 16;
  __half* a_tile = tiles + (mode == 2 ? 8 : 0);
  __half* b_tile = tiles + 16 * 32;
  for (int i = lane; i < 256; i += 32) {
    a_tile[(i / 16) * ld + i % 16] = __float2half_rn(a[i]);
    b_tile[i] = __float2half_rn(b[i]);  // column-major: element (k, n) at n * 16 + k
  }
  __syncthreads();
  if (mode == 4 && lane == 7) return;
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(acc, 0.0f);
  wmma::load_matrix_sync(fa, mode == 1 && lane == 3 ? a_tile + 16 : a_tile, ld);
  wmma::load_matrix_sync(fb, b_tile, 16);
  wmma::mma_sync(acc, fa, fb, acc);
  __shared__ __align__(32) float result[256];  // wmma stores need a 256-bit aligned tile; host memory may not be
  wmma::store_matrix_sync(result, acc, 16, wmma::mem_row_major);
  for (int i = lane; i < 256; i += 32) d[i] = result[i];
}

}  // namespace

extern "C" int bnbx_emu_wmma_selftest(int mode) {
  bnbx::emu::last_error() = {};
  std::vector<float> a(256), b(256), d(256, -1.0f);
  for (int i = 0; i < 256; ++i) {
    a[i] = static_cast<float>(i % 7) - 3.0f;  // small integers: exact in fp16 and in every sum
    b[i] = static_cast<float>(i % 5) - 2.0f;
  }
  bnbx::emu::launch(wmma_kernel, dim3(1), dim3(32),
                    std::tuple<const float*, const float*, float*, int>(a.data(), b.data(), d.data(), mode));
  if (bnbx::emu::last_error().set) return 1;
  for (int i = 0; i < 16; ++i) {
    for (int j = 0; j < 16; ++j) {
      float sum = 0.0f;
      for (int k = 0; k < 16; ++k) sum += a[i * 16 + k] * b[j * 16 + k];
      if (d[i * 16 + j] != sum) {
        bnbx::emu::fail("wmma selftest: wrong product");
        return 1;
      }
    }
  }
  return 0;
}

extern "C" int bnbx_emu_selftest(int mode) {
  bnbx::emu::last_error() = {};
  constexpr int kBlocks = 3, kThreads = 128;
  std::vector<uint32_t> in(kBlocks * kThreads), out(kBlocks, 0);
  for (size_t i = 0; i < in.size(); ++i) in[i] = static_cast<uint32_t>(i * 7 + 1);
  bnbx::emu::launch(reduce_kernel, dim3(kBlocks), dim3(kThreads),
                    std::tuple<const uint32_t*, uint32_t*, int>(in.data(), out.data(), mode));
  if (bnbx::emu::last_error().set) return 1;
  for (int b = 0; b < kBlocks; ++b) {
    uint32_t expected = 0;
    for (int t = 0; t < kThreads; ++t) expected += in[b * kThreads + t];
    if (out[b] != expected) {
      bnbx::emu::fail("selftest: wrong block sum");
      return 1;
    }
  }
  return 0;
}
