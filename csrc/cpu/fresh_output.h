// Fresh outputs of the CPU ops. A large fresh output is written once, by the kernel; on Linux most of its
// cost is the page faults of first touch (one per 4 KiB page, each zeroing its page), about as much as the
// pass itself for a 4096x11008 weight. For large outputs ask for transparent huge pages (2 MiB, one fault
// each) on the 2 MiB-aligned part of the allocation, where the kernel's THP mode is "madvise" (the common
// default); a hint only, so a refusal changes nothing.
#pragma once

#include <ATen/ops/empty.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <cstdint>

namespace bnbx::cpu {

constexpr int64_t kHugePageBytes = int64_t{2} << 20;

inline void advise_huge_pages(const at::Tensor& out) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const int64_t bytes = out.numel() * static_cast<int64_t>(out.element_size());
  if (bytes < 4 * kHugePageBytes) return;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(out.const_data_ptr());
  const uintptr_t first = (begin + kHugePageBytes - 1) & ~static_cast<uintptr_t>(kHugePageBytes - 1);
  const uintptr_t last = (begin + bytes) & ~static_cast<uintptr_t>(kHugePageBytes - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)out;
#endif
}

// at::empty for an output the kernel writes in full.
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty(sizes, options);
  advise_huge_pages(out);
  return out;
}

}  // namespace bnbx::cpu
