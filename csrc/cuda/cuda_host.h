// Torch-facing host helpers of the CUDA ops (tensors, dtypes, the current stream). Only the torch part of each
// .cu includes this; the kernels and their launchers (cuda_utils.cuh) stay torch-free for the emulation.
#pragma once

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
// Only c10/cuda headers, not ATen/cuda/CUDAContext.h: that one includes cuSPARSE, cuBLAS and cuSOLVER
// headers, which a minimal CUDA toolkit (nvcc + cudart, as on the CI host) does not ship.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../common/checks.h"
#include "cuda_utils.cuh"

namespace bnbx::cuda {

// A contiguous tensor whose data starts on a 16-byte boundary, as the vector loads need. Fresh allocations
// always do; a view with an odd storage offset is copied (rare, and cheaper than a second kernel variant).
inline at::Tensor contiguous_aligned(const at::Tensor& t) {
  at::Tensor result = t.contiguous();
  if (!is_aligned(result.const_data_ptr(), 16)) result = result.clone();
  return result;
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }

// Calls f(T{}) with T the CUDA type of a float dtype the checks already accepted (float, __half,
// __nv_bfloat16); used instead of AT_DISPATCH_FLOATING_TYPES_AND2, which would also instantiate double.
template <typename F>
void dispatch_float(at::ScalarType dtype, const F& f) {
  switch (dtype) {
    case at::kFloat:
      return f(float{});
    case at::kHalf:
      return f(__half{});
    case at::kBFloat16:
      return f(__nv_bfloat16{});
    default:
      TORCH_INTERNAL_ASSERT(false, "unchecked dtype ", dtype);
  }
}

}  // namespace bnbx::cuda
