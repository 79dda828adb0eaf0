// Helpers every kernel family uses, included inside namespace bnbx::cpu::BNBX_ISA after isa_unit.h: the
// scalar fp16/bf16 conversions, the scalar block absmax, and the SIMD helpers of this unit's instruction set
// (simd_avx512.h or simd_avx2.h: loads and conversions of fp32/fp16/bf16, stores, reductions).
#pragma once

#include "float_convert.h"

// Calls f(std::integral_constant<FloatType, type>{}) for a run-time dtype: a table entry's dtype switch, written
// once (f instantiates the kernel for each dtype).
template <typename F>
static inline void with_float_type(FloatType type, F&& f) {
  switch (type) {
    case FloatType::kFloat32:
      return f(std::integral_constant<FloatType, FloatType::kFloat32>{});
    case FloatType::kFloat16:
      return f(std::integral_constant<FloatType, FloatType::kFloat16>{});
    case FloatType::kBFloat16:
      return f(std::integral_constant<FloatType, FloatType::kBFloat16>{});
  }
}

// Largest |x| of a block; sets *nonfinite when the block holds a NaN or an Inf.
template <FloatType kIn>
static inline float block_absmax(const void* in, int64_t start, int64_t end, bool* nonfinite) {
  float absmax = 0.0f;
  bool bad = false;
  for (int64_t i = start; i < end; ++i) {
    const float magnitude = std::fabs(load_as_float<kIn>(in, i));
    bad |= !(magnitude <= FLT_MAX);
    absmax = magnitude > absmax ? magnitude : absmax;
  }
  *nonfinite = bad;
  return absmax;
}

#if defined(__AVX512F__) || defined(__AVX2__)
// The SIMD paths assume IEEE subnormals. With flush-to-zero or denormals-are-zero set in this thread's MXCSR
// (torch.set_flush_denormal(True)) the generic loops' float compares and products see subnormals as zero
// while integer shortcuts do not, so every SIMD entry point then runs the generic loop instead.
static inline bool denormals_flushed() { return (_mm_getcsr() & 0x8040u) != 0; }  // FTZ (bit 15) | DAZ (bit 6)

// Asks for the cache lines 8 KiB ahead of in[start, start + count). A pass that streams its input through a
// short computation leaves the core waiting on memory between blocks when the hardware prefetcher alone
// fetches; this overlaps the loads with the work (quantize_4bit, the fake-quant range pass).
constexpr int64_t kPrefetchAheadBytes = 8192;

template <FloatType kIn>
static inline void prefetch_ahead(const void* in, int64_t start, int64_t count) {
  constexpr int64_t kBytes = kIn == FloatType::kFloat32 ? 4 : 2;
  const char* ahead = static_cast<const char*>(in) + start * kBytes + kPrefetchAheadBytes;
  for (int64_t offset = 0; offset < count * kBytes; offset += 64) _mm_prefetch(ahead + offset, _MM_HINT_T0);
}
#endif

#if defined(__AVX512F__)
#include "simd_avx512.h"
#elif defined(__AVX2__)
#include "simd_avx2.h"
#endif
