// 8-bit blockwise kernels of csrc/cuda/quantize_8bit.cu, compiled as C++ for the host emulation (emulator.h).
#include "../quantize_8bit.cu"

#include "emulator.h"

extern "C" int bnbx_emu_quantize_blockwise(int dtype, const void* in, const float* code, int64_t n, int64_t blocksize,
                                           uint8_t* codes, float* absmax) {
  return bnbx::emu::run(dtype, [&](auto tag) {
    using T = decltype(tag);
    bnbx::cuda::launch_quantize_blockwise<T>(static_cast<const T*>(in), code, n, blocksize, codes, absmax, nullptr);
  });
}

extern "C" int bnbx_emu_dequantize_blockwise(int dtype, const uint8_t* codes, const float* absmax, const float* code,
                                             int64_t n, int64_t blocksize, void* out) {
  return bnbx::emu::run(dtype, [&](auto tag) {
    using T = decltype(tag);
    bnbx::cuda::launch_dequantize_blockwise<T>(codes, absmax, code, n, blocksize, static_cast<T*>(out), nullptr);
  });
}
