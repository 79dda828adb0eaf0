// Kernels that check the emulator itself: one correct block reduction, and three that break CUDA's rules
// (a barrier some threads skip by exiting, a shuffle with exited lanes, a warp split between a shuffle and
// a barrier, a barrier that some threads reach as __syncthreads_or and others as __syncthreads).
// tests/test_cuda_emulation.py expects the first to pass and the others to be reported.
#include <vector>

#include "emulator.h"

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

}  // namespace

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
