// int8 kernels of csrc/cuda/quantize_int8.cu, compiled as C++ for the host emulation (see emulator.h).
#include "../quantize_int8.cu"

#include <vector>

#include "emulator.h"

extern "C" int bnbx_emu_quantize_int8(int dtype, const void* in, int64_t n, int64_t group_size, int symmetric,
                                      int8_t* q, float* scale, int32_t* zero_point) {
  return bnbx::emu::run(dtype, [&](auto tag) {
    using T = decltype(tag);
    // exactly the size the launcher asks for, so ASan sees any overrun of the workspace
    std::vector<bnbx::cuda::Range> workspace(bnbx::cuda::quantize_int8_workspace<T>(n, group_size));
    bnbx::cuda::launch_quantize_int8<T>(static_cast<const T*>(in), n, group_size, symmetric != 0, q, scale, zero_point,
                                        workspace.data(), nullptr);
  });
}

extern "C" int bnbx_emu_dequantize_int8(int dtype, const int8_t* q, const float* scale, const int32_t* zero_point,
                                        int64_t n, int64_t group_size, void* out) {
  return bnbx::emu::run(dtype, [&](auto tag) {
    using T = decltype(tag);
    bnbx::cuda::launch_dequantize_int8<T>(q, scale, zero_point, n, group_size, static_cast<T*>(out), nullptr);
  });
}
