// The top of every generated per-ISA unit's family header (cpu/kernels/<family>_impl.h): the system headers
// and intrinsics the kernels may use. Included outside any namespace; BNBX_ISA is scalar, avx2 or avx512, and
// the unit's compiler flags (CMakeLists.txt, bnbx_add_cpu_family) decide which instructions are allowed.
// No torch headers: see quantize_4bit.h.
#pragma once

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ < 13
// GCC 12's AVX-512 intrinsics start from _mm512_undefined_*() and trip -Wmaybe-uninitialized wherever
// they are inlined (GCC PR 105593, fixed in GCC 13); the warning says nothing about this code.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include "../../common/formats.h"
#include "../../common/rules.h"

// The name of this unit's table of a family: BNBX_TABLE(quantize_4bit) is quantize_4bit_avx512 in the
// avx512 unit, and BNBX_ISA_NAME its instruction set as a string.
#define BNBX_STRINGIFY_(x) #x
#define BNBX_STRINGIFY(x) BNBX_STRINGIFY_(x)
#define BNBX_TABLE_(family, isa) family##_##isa
#define BNBX_TABLE_EXPAND_(family, isa) BNBX_TABLE_(family, isa)
#define BNBX_TABLE(family) BNBX_TABLE_EXPAND_(family, BNBX_ISA)
#define BNBX_ISA_NAME BNBX_STRINGIFY(BNBX_ISA)
