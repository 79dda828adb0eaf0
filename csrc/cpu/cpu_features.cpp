#include "cpu_features.h"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

#if defined(__linux__) && defined(__x86_64__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace bnbx::cpu {
namespace {

bool cpu_has_avx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

bool cpu_has_avx512() {
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}

// -1 when the name is unknown or the CPU lacks the instruction set.
int isa_by_name(const char* name) {
  if (std::strcmp(name, "scalar") == 0) return static_cast<int>(Isa::kScalar);
  if (std::strcmp(name, "avx2") == 0) return cpu_has_avx2() ? static_cast<int>(Isa::kAvx2) : -1;
  if (std::strcmp(name, "avx512") == 0) return cpu_has_avx512() ? static_cast<int>(Isa::kAvx512) : -1;
  return -1;
}

Isa best_isa() {
  const char* requested = std::getenv("BNBX_CPU_CAPABILITY");
  if (requested != nullptr && requested[0] != '\0') {
    // an unknown or unsupported request falls back to the best available set; bnbx.env() reports which
    const int isa = isa_by_name(requested);
    if (isa >= 0) return static_cast<Isa>(isa);
  }
  if (cpu_has_avx512()) return Isa::kAvx512;
  if (cpu_has_avx2()) return Isa::kAvx2;
  return Isa::kScalar;
}

std::atomic<int> active{-1};

#if defined(__linux__) && defined(__x86_64__)
// Linux hands out the AMX tile state only to processes that ask for it (arch_prctl ARCH_REQ_XCOMP_PERM).
bool request_amx_permission() {
  constexpr int kArchReqXcompPerm = 0x1023;
  constexpr int kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}
#else
bool request_amx_permission() { return false; }
#endif

}  // namespace

Isa active_isa() {
  int isa = active.load(std::memory_order_acquire);
  if (isa < 0) {
    isa = static_cast<int>(best_isa());
    active.store(isa, std::memory_order_release);
  }
  return static_cast<Isa>(isa);
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "scalar";
  }
}

bool cpu_has_avx512_vnni() { return cpu_has_avx512() && __builtin_cpu_supports("avx512vnni"); }

bool cpu_has_avx512_bf16() { return cpu_has_avx512() && __builtin_cpu_supports("avx512bf16"); }

bool cpu_has_amx() {
  static const bool available = [] {
    if (!cpu_has_avx512()) return false;
    unsigned eax, ebx, ecx, edx;
    // CPUID leaf 7, subleaf 0, EDX: bit 22 AMX-BF16, bit 24 AMX-TILE, bit 25 AMX-INT8
    __asm__ volatile("cpuid" : "=a"(eax), "=b"(ebx), "=c"(ecx), "=d"(edx) : "a"(7), "c"(0));
    const bool hardware = (edx >> 22 & 1) && (edx >> 24 & 1) && (edx >> 25 & 1);
    return hardware && request_amx_permission();
  }();
  return available;
}

}  // namespace bnbx::cpu

// A small C interface for Python (ctypes), outside the op registry: build and CPU facts for
// `python -m bnbx env`, and switching instruction sets so one test process can check every variant.
extern "C" {

const char* bnbx_cpu_capability() { return bnbx::cpu::isa_name(bnbx::cpu::active_isa()); }

// Returns 1 when `name` is available on this CPU and now in use, else 0 (nothing changes).
int bnbx_set_cpu_capability(const char* name) {
  const int isa = bnbx::cpu::isa_by_name(name);
  if (isa < 0) return 0;
  bnbx::cpu::active.store(isa, std::memory_order_release);
  return 1;
}

// Comma-separated extensions the kernels may use beyond the active set: avx512_vnni, avx512_bf16, amx.
const char* bnbx_cpu_extensions() {
  static const std::string text = [] {
    std::string s;
    auto add = [&s](bool has, const char* name) {
      if (!has) return;
      if (!s.empty()) s += ",";
      s += name;
    };
    add(bnbx::cpu::cpu_has_avx512_vnni(), "avx512_vnni");
    add(bnbx::cpu::cpu_has_avx512_bf16(), "avx512_bf16");
    add(bnbx::cpu::cpu_has_amx(), "amx");
    return s;
  }();
  return text.c_str();
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
