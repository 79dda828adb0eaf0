// CPU kernel family `fake_quant_lsq` (QAT): LSQ / LSQ+ fake quantization with a given scale and offset, forward
// and backward, one table per instruction set (compiled from fake_quant_lsq_impl.h by bnbx_add_cpu_family).
// No torch headers (see kernels.h). The per-element rules are bnbx::lsq_fake_quant / lsq_backward in
// common/rules.h; fp64 runs a plain loop in the host code (csrc/cpu/fake_quant_lsq.cpp).
#pragma once

#include <cstdint>

#include "../../common/formats.h"
#include "../../common/rules.h"

namespace bnbx::cpu {

// One row's parameters in fp32: inv_scale = 1 / scale, qmin < qmax.
struct LsqParams {
  float scale, inv_scale, offset, qmin, qmax;
};

struct FakeQuantLsqKernels {
  const char* name;  // "scalar", "avx2" or "avx512"

  // out[begin, end) = lsq_fake_quant(in[i]) in fp32, rounded once to `type`; `in` and `out` have that type.
  // `stream`: write the output around the caches (non-temporal stores, where the instruction set has them).
  void (*forward)(FloatType type, const void* in, void* out, int64_t begin, int64_t end, const LsqParams& p,
                  bool stream);
  // grad_x[begin, end) = grad * inside, and the sums over [begin, end) of the scale term grad * slope and
  // the offset term grad * outside (fp32 terms, summed in double over kLsqLanes lanes, then lanes 0..15 in
  // order: the same bits on every instruction set). x, grad and grad_x have the type `type`.
  void (*backward)(FloatType type, const void* x, const void* grad, void* grad_x, int64_t begin, int64_t end,
                   const LsqParams& p, bool stream, double* scale_sum, double* offset_sum);
};

extern const FakeQuantLsqKernels fake_quant_lsq_scalar;
extern const FakeQuantLsqKernels fake_quant_lsq_avx2;
extern const FakeQuantLsqKernels fake_quant_lsq_avx512;

}  // namespace bnbx::cpu
