// Error reporting of the CUDA host emulation (see emulator.h).
#include "emulator.h"

extern "C" const char* bnbx_emu_error() { return bnbx::emu::last_error().message.c_str(); }

// The emulated GPU, for tests that want to size inputs to span several waves of blocks.
extern "C" int bnbx_emu_sm_count() { return bnbx::emu::kSMs; }
