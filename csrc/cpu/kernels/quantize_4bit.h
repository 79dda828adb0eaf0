// CPU kernel table of the 4-bit family (NF4/FP4 blockwise), one per instruction set: quantize_4bit_impl.h is
// compiled once per set (bnbx_add_cpu_family in CMakeLists.txt), each unit in its own namespace with its
// own flags; host code picks the active table with cpu::select_kernels (cpu/cpu_features.h).
//
// These headers and units include no torch headers: torch's inline functions compiled with AVX-512 flags
// could otherwise be picked by the linker for the scalar path and fault on an AVX2-only CPU (the
// one-definition-rule trap).
//
// Every kernel works on a range of blocks [block_begin, block_end) of a flat, contiguous tensor, so the
// host code can split the work with at::parallel_for.
#pragma once

#include <cstdint>

#include "../../common/formats.h"

namespace bnbx::cpu {

struct Quantize4bitKernels {
  const char* name;  // "scalar", "avx2" or "avx512"

  // in[n] -> packed[ceil(n/2)] (element 2j in the high nibble), absmax[ceil(n/blocksize)].
  // blocksize is even, so every block starts on a byte boundary.
  void (*quantize)(FloatType in_type, const void* in, int64_t n, int64_t blocksize, QuantType quant_type,
                   uint8_t* packed, float* absmax, int64_t block_begin, int64_t block_end);
  void (*dequantize)(FloatType out_type, const uint8_t* packed, const float* absmax, int64_t n, int64_t blocksize,
                     QuantType quant_type, void* out, int64_t block_begin, int64_t block_end);
};

extern const Quantize4bitKernels quantize_4bit_scalar;
extern const Quantize4bitKernels quantize_4bit_avx2;
extern const Quantize4bitKernels quantize_4bit_avx512;

}  // namespace bnbx::cpu
