// The C interface of the CUDA host emulation (a shared library that tests/cuda_emulation.py builds with g++
// and loads with ctypes). Each family's unit includes its .cu file, compiled as C++ over cuda_shim.h, and
// exports its launchers. Every function returns 0, or 1 with the reason in bnbx_emu_error().
#pragma once

#include <cstdint>

#include "cuda_shim.h"

namespace bnbx::emu {

// dtype codes: FloatType of formats.h (0 fp32, 1 fp16, 2 bf16).
template <typename F>
int run(int dtype, const F& f) {
  last_error() = {};
  switch (dtype) {
    case 0:
      f(float{});
      break;
    case 1:
      f(__half{});
      break;
    case 2:
      f(__nv_bfloat16{});
      break;
    default:
      fail("unknown dtype code " + std::to_string(dtype));
  }
  return last_error().set ? 1 : 0;
}

}  // namespace bnbx::emu
