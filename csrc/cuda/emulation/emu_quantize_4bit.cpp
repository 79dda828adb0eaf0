// 4-bit kernels of csrc/cuda/quantize_4bit.cu, compiled as C++ for the host emulation (see emulator.h).
#include "../quantize_4bit.cu"

#include "emulator.h"

using bnbx::QuantType;

extern "C" int bnbx_emu_quantize_4bit(int dtype, int quant_type, const void* in, int64_t n, int64_t blocksize,
                                      uint8_t* packed, float* absmax) {
  return bnbx::emu::run(dtype, [&](auto tag) {
    using T = decltype(tag);
    bnbx::cuda::launch_quantize_4bit<T>(static_cast<const T*>(in), n, blocksize, static_cast<QuantType>(quant_type),
                                        packed, absmax, nullptr);
  });
}

extern "C" int bnbx_emu_dequantize_4bit(int dtype, int quant_type, const uint8_t* packed, const float* absmax,
                                        int64_t n, int64_t blocksize, void* out) {
  return bnbx::emu::run(dtype, [&](auto tag) {
    using T = decltype(tag);
    bnbx::cuda::launch_dequantize_4bit<T>(packed, absmax, n, blocksize, static_cast<QuantType>(quant_type),
                                          static_cast<T*>(out), nullptr);
  });
}
