// Host emulation of the CUDA built-ins the kernels use, so that csrc/cuda/*.cu compile as plain C++ (g++)
// and run on the CPU in CI, where no GPU is lent. cuda_utils.cuh includes this instead of the CUDA headers
// when BNBX_CUDA_EMULATION is defined; the kernels themselves are compiled unchanged.
//
// Execution model: the blocks of a grid run one after another; inside a block every CUDA thread is a fiber
// (ucontext) with its own stack, resumed round-robin by a scheduler. A thread runs until __syncthreads or
// a warp shuffle, where it parks; the scheduler releases a warp when all its live lanes wait at a shuffle,
// and the block when all its threads wait at the barrier. Divergence CUDA leaves undefined is reported as
// an error instead of hanging: a barrier some threads exited before, a shuffle with an exited lane, a warp
// split between a shuffle and a barrier. __shared__ variables are function statics (one block runs at a
// time, and ASan sees overflows of them as global-buffer-overflow).
//
// The float conversions round like the GPU's cvt.rn instructions, NaN included (0x7fff for fp16 and bf16),
// so a NaN that reaches a plain conversion shows up as a difference from the CPU kernels. Products and
// divisions are the host's IEEE fp32 ones (no FMA contraction: build with -ffp-contract=off).
#pragma once

#if !defined(BNBX_CUDA_EMULATION)
#error "cuda_shim.h is only for the host emulation build (define BNBX_CUDA_EMULATION)"
#endif
#if defined(__FAST_MATH__)
#error "bnbx: the CUDA emulation must be compiled without -ffast-math (NaN, Inf and subnormal blocks must stay exact)"
#endif

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#if defined(__has_feature)
#if __has_feature(address_sanitizer)
#define BNBX_EMU_ASAN 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__)
#define BNBX_EMU_ASAN 1
#endif
#if defined(BNBX_EMU_ASAN)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __constant__ static const

using std::isinf;
using std::isnan;

struct uint3 {
  unsigned int x, y, z;
};
struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};
struct dim3 {
  unsigned int x = 1, y = 1, z = 1;
  dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

// CUDA's integer min/max overloads (device code calls them unqualified on int64_t).
template <typename T>
inline T min(T a, T b) {
  return b < a ? b : a;
}
template <typename T>
inline T max(T a, T b) {
  return a < b ? b : a;
}

// --- runtime API subset ---------------------------------------------------------------------------------------

using cudaStream_t = struct EmuStream*;
enum cudaError_t { cudaSuccess = 0, cudaErrorLaunchFailure = 4 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16, cudaDevAttrMaxThreadsPerMultiProcessor = 39 };

namespace bnbx::emu {

// A small GPU: few SMs, so grid-stride loops run several tiles per block and alternate their scratch buffers.
constexpr int kSMs = 3;
constexpr int kThreadsPerSM = 2048;
constexpr int kMaxBlocksPerSM = 32;
constexpr int kMaxThreadsPerBlock = 1024;
constexpr int kWarp = 32;

struct Error {
  bool set = false;
  std::string message;
};
inline Error& last_error() {
  static Error error;
  return error;
}
inline void fail(const std::string& message) {
  if (!last_error().set) last_error() = {true, message};
}

}  // namespace bnbx::emu

inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int /*device*/) {
  *value = attr == cudaDevAttrMultiProcessorCount ? bnbx::emu::kSMs : bnbx::emu::kThreadsPerSM;
  return cudaSuccess;
}
template <typename Kernel>
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, Kernel /*kernel*/, int threads,
                                                                 size_t /*dynamic_shared*/) {
  const int by_threads = bnbx::emu::kThreadsPerSM / threads;
  *blocks = by_threads < bnbx::emu::kMaxBlocksPerSM ? by_threads : bnbx::emu::kMaxBlocksPerSM;
  return cudaSuccess;
}
inline cudaError_t cudaGetLastError() { return bnbx::emu::last_error().set ? cudaErrorLaunchFailure : cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t error) {
  return error == cudaSuccess ? "no error" : "emulated launch failure";
}

// --- fp16 / bf16 ------------------------------------------------------------------------------------------------

struct __half {
  uint16_t bits;
};
struct __half2 {
  __half lo, hi;
};
struct __nv_bfloat16 {
  uint16_t bits;
};
struct __nv_bfloat162 {
  __nv_bfloat16 lo, hi;
};

inline uint32_t __float_as_uint(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return bits;
}
inline float __uint_as_float(uint32_t bits) {
  float x;
  std::memcpy(&x, &bits, sizeof(x));
  return x;
}
inline int __float_as_int(float x) { return static_cast<int>(__float_as_uint(x)); }
inline float __int_as_float(int bits) { return __uint_as_float(static_cast<uint32_t>(bits)); }

inline __half __ushort_as_half(unsigned short bits) { return {bits}; }
inline unsigned short __half_as_ushort(__half h) { return h.bits; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short bits) { return {bits}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.bits; }

inline float __half2float(__half h) {
  const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  const uint32_t exponent = (h.bits >> 10) & 0x1fu;
  const uint32_t mantissa = h.bits & 0x3ffu;
  if (exponent == 0x1f) return __uint_as_float(sign | 0x7f800000u | (mantissa << 13));
  if (exponent == 0) {
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;  // exact: mantissa * 2^-24
    return sign ? -magnitude : magnitude;
  }
  return __uint_as_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

// cvt.rn.f16.f32: nearest even, overflow to Inf, every NaN to the canonical 0x7fff.
inline __half __float2half_rn(float f) {
  const uint32_t bits = __float_as_uint(f);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t abs_bits = bits & 0x7fffffffu;
  if (abs_bits > 0x7f800000u) return {0x7fff};
  if (abs_bits >= 0x477ff000u) return {static_cast<uint16_t>(sign | 0x7c00u)};
  if (abs_bits < 0x38800000u) {
    // fp16 subnormal or zero: |f| * 2^24 rounded to an integer, ties to even (exact integer arithmetic)
    const uint32_t exponent = abs_bits >> 23;
    if (exponent < 101) return {sign};  // below 2^-26: rounds to zero
    const uint32_t mantissa = (abs_bits & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126 - exponent;  // value * 2^24 = mantissa >> shift (shift in 14..25)
    const uint32_t whole = mantissa >> shift;
    const uint32_t rest = mantissa & ((1u << shift) - 1);
    const uint32_t half = 1u << (shift - 1);
    const uint32_t rounded = whole + ((rest > half || (rest == half && (whole & 1u))) ? 1u : 0u);
    return {static_cast<uint16_t>(sign | rounded)};
  }
  const uint32_t rebiased = abs_bits - (112u << 23);
  const uint32_t rounded = rebiased + 0xfffu + ((rebiased >> 13) & 1u);
  return {static_cast<uint16_t>(sign | (rounded >> 13))};
}

inline float __bfloat162float(__nv_bfloat16 h) { return __uint_as_float(static_cast<uint32_t>(h.bits) << 16); }

// cvt.rn.bf16.f32: nearest even, every NaN to the canonical 0x7fff.
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  const uint32_t bits = __float_as_uint(f);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return {0x7fff};
  return {static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16)};
}

inline __half2 __floats2half2_rn(float lo, float hi) { return {__float2half_rn(lo), __float2half_rn(hi)}; }
inline __half __low2half(__half2 h) { return h.lo; }
inline __half __high2half(__half2 h) { return h.hi; }
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
  return {__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)};
}
inline __nv_bfloat16 __low2bfloat16(__nv_bfloat162 h) { return h.lo; }
inline __nv_bfloat16 __high2bfloat16(__nv_bfloat162 h) { return h.hi; }

// --- the scheduler ------------------------------------------------------------------------------------------------

namespace bnbx::emu {

constexpr size_t kStackBytes = 256 * 1024;  // per emulated thread; ASan's redzones need the room

struct Fiber {
  enum State { kReady, kBarrier, kShuffle, kDone };
  ucontext_t context;
  State state = kReady;
  int barrier_kind = 0;  // at a barrier: 0 __syncthreads, 1 __syncthreads_or
  int predicate = 0;     // __syncthreads_or: this thread's predicate, then the block's OR
  uint64_t value = 0;    // shuffle: this lane's value (the payload's bytes)
  int source = 0;        // shuffle: the lane to read
  uint64_t result = 0;   // shuffle: what the lane gets back
};

struct Block {
  uint3 block_idx{0, 0, 0};
  dim3 grid_dim, block_dim;
  int threads = 0;
  int current = 0;
  void (*body)(void*) = nullptr;
  void* closure = nullptr;
  std::vector<Fiber> fibers;
  std::vector<char*> stacks;
  ucontext_t scheduler;
  bool abandoned = false;
#if defined(BNBX_EMU_ASAN)
  void* fake_stack = nullptr;
  const void* scheduler_stack_bottom = nullptr;
  size_t scheduler_stack_size = 0;
#endif
};

inline Block*& current_block() {
  static Block* block = nullptr;
  return block;
}

inline Block& block() {
  Block* b = current_block();
  if (b == nullptr) {
    std::fprintf(stderr, "bnbx emulation: a CUDA built-in was used outside a kernel launch\n");
    std::abort();
  }
  return *b;
}

// Scheduler -> fiber and fiber -> scheduler switches, annotated for ASan so it follows the stack changes.
inline void switch_to_fiber(Block& b, int index) {
  b.current = index;
#if defined(BNBX_EMU_ASAN)
  __sanitizer_start_switch_fiber(&b.fake_stack, b.stacks[index], kStackBytes);
#endif
  swapcontext(&b.scheduler, &b.fibers[index].context);
#if defined(BNBX_EMU_ASAN)
  __sanitizer_finish_switch_fiber(b.fake_stack, nullptr, nullptr);
#endif
}

inline void switch_to_scheduler(Block& b, bool finished) {
  Fiber& fiber = b.fibers[b.current];
#if defined(BNBX_EMU_ASAN)
  // a finished fiber never returns, so ASan may drop its fake stack (nullptr)
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(finished ? nullptr : &fake, b.scheduler_stack_bottom, b.scheduler_stack_size);
  swapcontext(&fiber.context, &b.scheduler);
  __sanitizer_finish_switch_fiber(fake, &b.scheduler_stack_bottom, &b.scheduler_stack_size);
#else
  (void)finished;
  swapcontext(&fiber.context, &b.scheduler);
#endif
}

inline void fiber_main() {
  Block& b = block();
#if defined(BNBX_EMU_ASAN)
  __sanitizer_finish_switch_fiber(nullptr, &b.scheduler_stack_bottom, &b.scheduler_stack_size);
#endif
  b.body(b.closure);
  b.fibers[b.current].state = Fiber::kDone;
  switch_to_scheduler(b, true);
}

inline uint3 thread_idx() {
  Block& b = block();
  const unsigned int t = static_cast<unsigned int>(b.current);
  return {t % b.block_dim.x, (t / b.block_dim.x) % b.block_dim.y, t / (b.block_dim.x * b.block_dim.y)};
}

// Parks the calling thread in `state` until the scheduler releases it.
inline void park(Fiber::State state) {
  Block& b = block();
  b.fibers[b.current].state = state;
  switch_to_scheduler(b, false);
}

// Releases every warp whose live lanes all wait at a shuffle; reports a warp split between a shuffle and the
// barrier, or a shuffle that waits on an exited lane. Returns whether any warp was released.
inline bool release_warps(Block& b) {
  bool released = false;
  for (int first = 0; first < b.threads; first += kWarp) {
    const int last = first + kWarp < b.threads ? first + kWarp : b.threads;
    int shuffling = 0, done = 0, waiting = 0;
    for (int t = first; t < last; ++t) {
      shuffling += b.fibers[t].state == Fiber::kShuffle;
      done += b.fibers[t].state == Fiber::kDone;
      waiting += b.fibers[t].state == Fiber::kBarrier;
    }
    if (shuffling == 0) continue;
    if (done > 0 || waiting > 0) {
      fail("warp " + std::to_string(first / kWarp) + ": a shuffle is missing lanes that " +
           (done > 0 ? "exited" : "wait at __syncthreads") + " (divergent __shfl_xor_sync with a full mask)");
      return false;
    }
    for (int t = first; t < last; ++t) {
      const int source = first + b.fibers[t].source;
      if (source >= last) {
        fail("warp shuffle reads lane " + std::to_string(b.fibers[t].source) + ", which does not exist");
        return false;
      }
      b.fibers[t].result = b.fibers[source].value;
    }
    for (int t = first; t < last; ++t) b.fibers[t].state = Fiber::kReady;
    released = true;
  }
  return released;
}

// A fresh context for thread t. Not inlined: getcontext returns like setjmp, so the caller's loop variables
// must not live in this frame (-Wclobbered).
__attribute__((noinline)) inline void init_fiber(Block& b, int t) {
  Fiber& fiber = b.fibers[t];
  fiber.state = Fiber::kReady;
  fiber.barrier_kind = 0;
  fiber.predicate = 0;
#if defined(BNBX_EMU_ASAN)
  // an abandoned launch (an error) can leave poisoned frames on the reused stack
  __asan_unpoison_memory_region(b.stacks[t], kStackBytes);
#endif
  getcontext(&fiber.context);
  fiber.context.uc_stack.ss_sp = b.stacks[t];
  fiber.context.uc_stack.ss_size = kStackBytes;
  fiber.context.uc_link = nullptr;
  makecontext(&fiber.context, fiber_main, 0);
}

// Runs one thread block to completion (or to the first error).
inline void run_block(Block& b) {
  for (int t = 0; t < b.threads; ++t) init_fiber(b, t);
  for (;;) {
    for (int t = 0; t < b.threads; ++t) {
      if (b.fibers[t].state == Fiber::kReady) switch_to_fiber(b, t);
    }
    if (last_error().set) return;
    if (release_warps(b)) continue;
    if (last_error().set) return;
    int done = 0, waiting = 0;
    for (const Fiber& fiber : b.fibers) {
      done += fiber.state == Fiber::kDone;
      waiting += fiber.state == Fiber::kBarrier;
    }
    if (done == b.threads) return;
    if (done > 0) {
      fail("__syncthreads reached by " + std::to_string(waiting) + " threads after " + std::to_string(done) +
           " exited (every thread of the block must reach each barrier)");
      return;
    }
    // every thread waits at a barrier: the kinds must agree (bar.sync and bar.red.or do not mix)
    int kind_or = 0, any = 0;
    for (const Fiber& fiber : b.fibers) {
      kind_or += fiber.barrier_kind;
      any |= fiber.predicate;
    }
    if (kind_or != 0 && kind_or != b.threads) {
      fail("a barrier reached by " + std::to_string(kind_or) + " threads at __syncthreads_or and the others at " +
           "__syncthreads");
      return;
    }
    for (Fiber& fiber : b.fibers) {
      fiber.state = Fiber::kReady;
      fiber.predicate = any;
    }
  }
}

// Runs kernel(args...) over grid x threads, block after block. Grid limits are the GPU's (x < 2^31, y and
// z < 2^16), so a launcher that would exceed them on a GPU fails here too.
template <typename... Params>
void launch(void (*kernel)(Params...), dim3 grid, dim3 threads, std::tuple<Params...> args) {
  const int count = static_cast<int>(threads.x * threads.y * threads.z);
  if (count < 1 || count > kMaxThreadsPerBlock || grid.x < 1 || grid.y < 1 || grid.z < 1 || grid.x > 2147483647u ||
      grid.y > 65535u || grid.z > 65535u) {
    fail("invalid launch: " + std::to_string(grid.x) + " x " + std::to_string(grid.y) + " x " + std::to_string(grid.z) +
         " blocks of " + std::to_string(count) + " threads");
    return;
  }
  struct Closure {
    void (*kernel)(Params...);
    std::tuple<Params...>* args;
  } closure{kernel, &args};
  Block b;
  b.grid_dim = grid;
  b.block_dim = threads;
  b.threads = count;
  b.closure = &closure;
  b.body = [](void* c) {
    auto* call = static_cast<Closure*>(c);
    std::tuple<Params...> copy = *call->args;  // kernel parameters are per-thread copies
    std::apply(call->kernel, copy);
  };
  b.fibers.resize(count);
  static std::vector<char*> stacks;  // reused across launches
  while (static_cast<int>(stacks.size()) < count) stacks.push_back(static_cast<char*>(std::malloc(kStackBytes)));
  b.stacks = stacks;
  current_block() = &b;
  for (unsigned int z = 0; z < grid.z && !last_error().set; ++z) {
    for (unsigned int y = 0; y < grid.y && !last_error().set; ++y) {
      for (unsigned int x = 0; x < grid.x && !last_error().set; ++x) {
        b.block_idx = {x, y, z};
        run_block(b);
      }
    }
  }
  current_block() = nullptr;
}

}  // namespace bnbx::emu

#define threadIdx (::bnbx::emu::thread_idx())
#define blockIdx (::bnbx::emu::block().block_idx)
#define blockDim (static_cast<const dim3&>(::bnbx::emu::block().block_dim))
#define gridDim (static_cast<const dim3&>(::bnbx::emu::block().grid_dim))

inline void __syncthreads() { bnbx::emu::park(bnbx::emu::Fiber::kBarrier); }

// bar.red.or: a barrier that also returns whether the predicate was non-zero in any thread of the block.
inline int __syncthreads_or(int predicate) {
  bnbx::emu::Block& b = bnbx::emu::block();
  b.fibers[b.current].barrier_kind = 1;
  b.fibers[b.current].predicate = predicate != 0;
  bnbx::emu::park(bnbx::emu::Fiber::kBarrier);
  bnbx::emu::Fiber& fiber = bnbx::emu::block().fibers[bnbx::emu::block().current];
  fiber.barrier_kind = 0;
  const int any = fiber.predicate;
  fiber.predicate = 0;
  return any;
}

// --- arithmetic intrinsics -------------------------------------------------------------------------------------
// The _rn forms are IEEE fp32 operations rounded to nearest even, which the host's SSE arithmetic is (the
// emulation is built with -ffp-contract=off, so nothing is fused).
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __int2float_rn(int x) { return static_cast<float>(x); }
// cvt.rni.s32.f32: nearest even; NaN gives 0 and out-of-range values saturate (PTX ISA, cvt).
inline int __float2int_rn(float x) {
  if (x != x) return 0;
  if (x >= 2147483648.0f) return 2147483647;
  if (x <= -2147483648.0f) return -2147483647 - 1;
  return static_cast<int>(std::nearbyint(x));
}
// dp4a.s32.s32: c + the sum of the four products of the signed bytes of a and b (little-endian lanes), with
// the int32 wrap-around of the hardware adder.
inline int __dp4a(int a, int b, int c) {
  uint32_t sum = static_cast<uint32_t>(c);
  for (int j = 0; j < 4; ++j) {
    const int x = static_cast<int8_t>(static_cast<uint32_t>(a) >> (8 * j));
    const int y = static_cast<int8_t>(static_cast<uint32_t>(b) >> (8 * j));
    sum += static_cast<uint32_t>(x * y);
  }
  return static_cast<int>(sum);
}
// ld.global.nc: a plain load here (the read-only cache changes no value).
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}

template <typename T>
inline T __shfl_xor_sync(unsigned int mask, T value, int lane_mask, int width = 32) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle payloads are at most 8 bytes here");
  bnbx::emu::Block& b = bnbx::emu::block();
  if (mask != 0xffffffffu) bnbx::emu::fail("__shfl_xor_sync: only the full-warp mask is emulated");
  bnbx::emu::Fiber& fiber = b.fibers[b.current];
  const int lane = b.current % bnbx::emu::kWarp;
  int source = lane ^ lane_mask;
  if (source / width != lane / width) source = lane;  // outside the caller's segment: own value
  fiber.value = 0;
  std::memcpy(&fiber.value, &value, sizeof(T));
  fiber.source = source;
  bnbx::emu::park(bnbx::emu::Fiber::kShuffle);
  T result;
  std::memcpy(&result, &b.fibers[b.current].result, sizeof(T));
  return result;
}
