// Fresh outputs of the CPU ops, from a cache of freed large outputs.
//
// A large fresh output is written once, by the kernel; on Linux most of its cost is first touch: one page fault
// per 4 KiB page, each zeroing its page (and in a VM that hands freed memory back to the host, the host's fault
// as well). For a 4096x11008 weight that is about as much as the pass itself, and a training loop asks for the
// same sizes every step. So, like torch's CUDA caching allocator: outputs of 1 MiB and more come from here (from
// 8 MiB in 2 MiB-aligned memory advised for transparent huge pages, one fault per 2 MiB), and when such an output
// is freed its memory is kept, up to a limit, and handed to the next output of about the same size, already
// mapped. (Below 8 MiB glibc's heap would hold the memory, but it hands the top of the heap back to the system
// when a block there is freed, so the next step faults it in again.)
//
// The limit: BNBX_CPU_CACHE_MB at import (default 1024; 0 turns the cache off), or bnbx.set_cpu_cache_limit().
// Off in sanitizer builds, where reused memory would hide use-after-free. Only outputs the kernel writes in
// full may come from here: reused memory holds an earlier tensor's values.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace bnbx::cpu {

// at::empty for an output the kernel writes in full (contiguous, CPU).
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);

// Whether a kernel should write `out` around the caches (non-temporal stores): at 8 MiB and more it would not
// stay there, and a store that bypasses them skips reading each line first (a third of the pass's traffic).
inline bool stream_output(const at::Tensor& out) {
  return out.numel() * static_cast<int64_t>(out.element_size()) >= (int64_t{8} << 20);
}

}  // namespace bnbx::cpu
