// Included once by each kernels_<isa>.cpp with BNBX_ISA set to scalar, avx2 or avx512; the compiler flags
// of that unit (CMakeLists.txt) decide which instructions the code below may use.
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ < 13
// GCC 12's AVX-512 intrinsics start from _mm512_undefined_*() and trip -Wmaybe-uninitialized wherever
// they are inlined (GCC PR 105593, fixed in GCC 13); the warning says nothing about this code.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include "kernels.h"

namespace bnbx::cpu {
namespace BNBX_ISA {

#include "float_convert.h"
#include "quantize_4bit_impl.h"
#include "quantize_8bit_impl.h"
#include "quantize_int8_impl.h"

}  // namespace BNBX_ISA

#define BNBX_STRINGIFY_(x) #x
#define BNBX_STRINGIFY(x) BNBX_STRINGIFY_(x)
#define BNBX_TABLE_NAME_(isa) kernels_##isa
#define BNBX_TABLE_NAME(isa) BNBX_TABLE_NAME_(isa)

const CpuKernels BNBX_TABLE_NAME(BNBX_ISA) = {
    BNBX_STRINGIFY(BNBX_ISA),
    &BNBX_ISA::quantize_4bit,
    &BNBX_ISA::dequantize_4bit,
    &BNBX_ISA::quantize_blockwise,
    &BNBX_ISA::dequantize_blockwise,
    &BNBX_ISA::quantize_int8,
    &BNBX_ISA::dequantize_int8,
};

}  // namespace bnbx::cpu
