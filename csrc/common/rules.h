// Per-element and per-block rules shared by every backend: the CPU kernels (each instruction set), the CUDA
// kernels and their host emulation, and fused epilogues of the matmul families. One definition each, so a
// rule can never drift between backends. `static inline` for the reason given in formats.h.
#pragma once

#include <cstdint>

#include "formats.h"

namespace bnbx {

// ceil(a / b) for a >= 0, b > 0, without the overflow of (a + b - 1) / b near INT64_MAX.
BNBX_HOST_DEVICE static inline int64_t ceil_div(int64_t a, int64_t b) { return a / b + (a % b != 0 ? 1 : 0); }

}  // namespace bnbx
