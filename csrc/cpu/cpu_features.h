// Which CPU instruction set the kernels use in this process: the strongest one the CPU supports, unless the
// environment variable BNBX_CPU_CAPABILITY (scalar | avx2 | avx512) asks for a weaker one, the way
// ATEN_CPU_CAPABILITY does for ATen.
//
// Each kernel family has its own table of function pointers per instruction set (cpu/kernels/<family>.h,
// compiled from <family>_impl.h once per set by bnbx_add_cpu_family in CMakeLists.txt); host code picks
// the table of the active set with select_kernels, so one switch (tests, BNBX_CPU_CAPABILITY) moves
// every family together.
#pragma once

#include <cstdint>

namespace bnbx::cpu {

enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

Isa active_isa();
const char* isa_name(Isa isa);

template <class Table>
const Table& select_kernels(const Table& scalar, const Table& avx2, const Table& avx512) {
  switch (active_isa()) {
    case Isa::kAvx512:
      return avx512;
    case Isa::kAvx2:
      return avx2;
    default:
      return scalar;
  }
}

// Extensions beyond the AVX-512 baseline that some families use inside their avx512 unit after checking
// for them at run time (each needs its own target attribute or compiler flag there).
bool cpu_has_avx512_vnni();
bool cpu_has_avx512_bf16();
bool cpu_has_amx();  // AMX-TILE, AMX-INT8 and AMX-BF16, with the OS permission to use the tiles

}  // namespace bnbx::cpu
