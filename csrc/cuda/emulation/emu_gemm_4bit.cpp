// gemm_4bit kernels of csrc/cuda/gemm_4bit.cu (the fused GEMV, the tensor-core tiles over wmma_shim.h, and the
// absmax decode of the large-M path), compiled as C++ for the host emulation (see emulator.h). The large-M path's
// dequantization is the dequantize_4bit kernel (emu_quantize_4bit.cpp); its at::mm is cuBLAS and not emulated.
#include "../gemm_4bit.cu"

#include <cmath>
#include <vector>

#include "emulator.h"

namespace {

// nested_code == nullptr: absmax is fp32; otherwise absmax is the uint8 codes of double quantization.
bnbx::cuda::Scales scales_of(const void* absmax, const float* nested_absmax, const float* nested_code,
                             const float* offset, int64_t nested_blocksize) {
  bnbx::cuda::Scales s{};
  if (nested_code == nullptr) {
    s.absmax = static_cast<const float*>(absmax);
    return s;
  }
  s.absmax_q = static_cast<const uint8_t*>(absmax);
  s.nested_absmax = nested_absmax;
  s.nested_code = nested_code;
  s.offset = offset;
  s.nested_shift = bnbx::cuda::log2_exact(nested_blocksize);
  return s;
}

}  // namespace

extern "C" int bnbx_emu_gemv_4bit(int dtype, int quant_type, const void* A, const uint8_t* W, const void* absmax,
                                  const float* nested_absmax, const float* nested_code, const float* offset,
                                  int64_t nested_blocksize, const void* bias, int64_t M, int64_t K, int64_t N,
                                  int64_t blocksize, void* out) {
  return bnbx::emu::run(dtype, [&](auto tag) {
    using T = decltype(tag);
    const bnbx::cuda::Scales s = scales_of(absmax, nested_absmax, nested_code, offset, nested_blocksize);
    bnbx::cuda::launch_gemv_4bit<T>(static_cast<const T*>(A), W, s, static_cast<bnbx::QuantType>(quant_type),
                                    static_cast<const T*>(bias), M, K, N, blocksize, static_cast<T*>(out), nullptr);
  });
}

extern "C" int bnbx_emu_gemm_4bit_tiles(int dtype, int quant_type, const void* A, const uint8_t* W, const void* absmax,
                                        const float* nested_absmax, const float* nested_code, const float* offset,
                                        int64_t nested_blocksize, const void* bias, int64_t M, int64_t K, int64_t N,
                                        int64_t blocksize, void* out) {
  return bnbx::emu::run(dtype, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (std::is_same_v<T, float>) {
      bnbx::emu::fail("gemm_4bit_tiles: fp16 or bf16 only");
    } else {
      const bnbx::cuda::Scales s = scales_of(absmax, nested_absmax, nested_code, offset, nested_blocksize);
      const bnbx::cuda::TilesPlan plan = bnbx::cuda::plan_tiles<T>(M, K, N);
      std::vector<float> workspace(plan.workspace_floats, std::nanf(""));  // poisoned: every sum must be written
      bnbx::cuda::launch_gemm_4bit_tiles<T>(
          static_cast<const T*>(A), W, s, static_cast<bnbx::QuantType>(quant_type), static_cast<const T*>(bias), M, K,
          N, blocksize, plan, workspace.empty() ? nullptr : workspace.data(), static_cast<T*>(out), nullptr);
    }
  });
}

extern "C" int bnbx_emu_decode_absmax(const uint8_t* absmax_q, const float* nested_absmax, const float* nested_code,
                                      const float* offset, int64_t nested_blocksize, int64_t blocks, float* out) {
  return bnbx::emu::run(0, [&](auto) {
    const bnbx::cuda::Scales s = scales_of(absmax_q, nested_absmax, nested_code, offset, nested_blocksize);
    bnbx::cuda::launch_decode_absmax(s, blocks, out, nullptr);
  });
}
