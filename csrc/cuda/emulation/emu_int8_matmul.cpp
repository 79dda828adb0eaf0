// LLM.int8() kernels of csrc/cuda/int8_matmul.cu, compiled as C++ for the host emulation (see emulator.h). The
// torch host steps between them (outlier column indices, gathers, the fp32 addmm beyond 32 outlier columns) are
// repeated by tests/cuda_emulation.py.
#include "../int8_matmul.cu"

#include "emulator.h"

extern "C" int bnbx_emu_int8_outlier_columns(int dtype, const void* A, int64_t rows, int64_t K, float threshold,
                                             uint8_t* mask) {
  return bnbx::emu::run(dtype, [&](auto tag) {
    using T = decltype(tag);
    bnbx::cuda::launch_outlier_columns<T>(static_cast<const T*>(A), rows, K, threshold, mask, nullptr);
  });
}

extern "C" int bnbx_emu_int8_vectorwise_quant(int dtype, const void* A, int64_t rows, int64_t K, float threshold,
                                              const uint8_t* mask, int8_t* q, float* stats) {
  return bnbx::emu::run(dtype, [&](auto tag) {
    using T = decltype(tag);
    bnbx::cuda::launch_vectorwise_quant<T>(static_cast<const T*>(A), rows, K, threshold, mask, q, stats, nullptr);
  });
}

extern "C" int bnbx_emu_int8_vectorwise_dequant(const int8_t* q, const float* stats, int64_t n, int64_t K, float* out) {
  return bnbx::emu::run(0, [&](auto) { bnbx::cuda::launch_vectorwise_dequant(q, stats, n, K, out, nullptr); });
}

extern "C" int bnbx_emu_int8_gemm(const int8_t* A, const int8_t* B, int32_t* C, int64_t M, int64_t N, int64_t K) {
  return bnbx::emu::run(0, [&](auto) { bnbx::cuda::launch_int8_gemm(A, B, C, M, N, K, nullptr); });
}

extern "C" int bnbx_emu_int8_mm_dequant(int dtype, const int32_t* C, const float* row_stats, const float* col_stats,
                                        const float* bias, const float* a_out, const float* b_out, int64_t n_out,
                                        void* out, int64_t rows, int64_t N) {
  return bnbx::emu::run(dtype, [&](auto tag) {
    using T = decltype(tag);
    bnbx::cuda::launch_mm_dequant<T>(C, row_stats, col_stats, bias, a_out, b_out, n_out, static_cast<T*>(out), rows, N,
                                     nullptr);
  });
}
