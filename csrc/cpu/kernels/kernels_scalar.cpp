// The scalar build of the CPU kernels; its compiler flags are set in CMakeLists.txt.
#define BNBX_ISA scalar
#include "kernels_impl.h"
