#include "cpu_features.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace bnbx::cpu {
namespace {

bool cpu_has_avx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

bool cpu_has_avx512() {
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}

// nullptr when the name is unknown or the CPU lacks the instruction set.
const CpuKernels* kernels_by_name(const char* name) {
  if (std::strcmp(name, "scalar") == 0) return &kernels_scalar;
  if (std::strcmp(name, "avx2") == 0) return cpu_has_avx2() ? &kernels_avx2 : nullptr;
  if (std::strcmp(name, "avx512") == 0) return cpu_has_avx512() ? &kernels_avx512 : nullptr;
  return nullptr;
}

const CpuKernels* best_kernels() {
  const char* requested = std::getenv("BNBX_CPU_CAPABILITY");
  if (requested != nullptr && requested[0] != '\0') {
    if (const CpuKernels* kernels = kernels_by_name(requested)) return kernels;
    // an unknown or unsupported request falls back to the best available set; bnbx.env() reports which
  }
  if (cpu_has_avx512()) return &kernels_avx512;
  if (cpu_has_avx2()) return &kernels_avx2;
  return &kernels_scalar;
}

std::atomic<const CpuKernels*> active{nullptr};

}  // namespace

const CpuKernels& cpu_kernels() {
  const CpuKernels* kernels = active.load(std::memory_order_acquire);
  if (kernels == nullptr) {
    kernels = best_kernels();
    active.store(kernels, std::memory_order_release);
  }
  return *kernels;
}

}  // namespace bnbx::cpu

// A small C interface for Python (ctypes), outside the op registry: build and CPU facts for
// `python -m bnbx env`, and switching instruction sets so one test process can check every variant.
extern "C" {

const char* bnbx_cpu_capability() { return bnbx::cpu::cpu_kernels().name; }

// Returns 1 when `name` is available on this CPU and now in use, else 0 (nothing changes).
int bnbx_set_cpu_capability(const char* name) {
  const bnbx::cpu::CpuKernels* kernels = bnbx::cpu::kernels_by_name(name);
  if (kernels == nullptr) return 0;
  bnbx::cpu::active.store(kernels, std::memory_order_release);
  return 1;
}

int bnbx_cuda_built() {
#ifdef BNBX_WITH_CUDA
  return 1;
#else
  return 0;
#endif
}

const char* bnbx_cuda_architectures() {
#ifdef BNBX_CUDA_ARCHITECTURES
  return BNBX_CUDA_ARCHITECTURES;
#else
  return "";
#endif
}
}
