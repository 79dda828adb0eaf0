// The avx512 build of the CPU kernels; its compiler flags are set in CMakeLists.txt.
#define BNBX_ISA avx512
#include "kernels_impl.h"
