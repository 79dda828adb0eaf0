// The CPU kernel table for this process: the strongest instruction set the CPU supports, unless the
// environment variable BNBX_CPU_CAPABILITY (scalar | avx2 | avx512) asks for a weaker one, the way
// ATEN_CPU_CAPABILITY does for ATen.
#pragma once

#include "kernels/kernels.h"

namespace bnbx::cpu {

const CpuKernels& cpu_kernels();

// Work split for at::parallel_for: about 32K elements per task, in whole blocks.
inline int64_t grain_in_blocks(int64_t blocksize) { return blocksize >= 32768 ? 1 : 32768 / blocksize; }

}  // namespace bnbx::cpu
