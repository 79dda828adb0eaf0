// The avx2 build of the CPU kernels; its compiler flags are set in CMakeLists.txt.
#define BNBX_ISA avx2
#include "kernels_impl.h"
