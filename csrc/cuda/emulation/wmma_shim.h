// Host emulation of the warp matrix functions (nvcuda::wmma, <mma.h>) that gemm_4bit's tile kernel uses.
//
// A fragment's layout across the lanes of a warp is unspecified on a GPU, and the kernels never index one, so
// here every lane holds the whole tile (as floats: fp16 and bf16 convert exactly) and each collective
// operation is computed by every lane. What CUDA requires of a call is checked instead of assumed: every lane
// of the warp takes part (each operation meets the warp at a shuffle, so a divergent call is reported like a
// divergent shuffle) and pointer and stride are the same in every lane. The tile pointers must be 256-bit
// aligned and the stride a multiple of 16 bytes, as the CUDA programming guide asks of load/store_matrix_sync.
//
// mma_sync sums each output's 16 products in order, in fp32, onto the accumulator. Tensor cores compute the
// products exactly and may sum them in another order or with other intermediate precision, so tests bound the
// error instead of comparing bits.
#pragma once

#include <cstdint>
#include <type_traits>

#include "cuda_shim.h"

namespace nvcuda::wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int kRows = std::is_same_v<Use, matrix_b> ? K : M;
  static constexpr int kCols = std::is_same_v<Use, matrix_a> ? K : N;
  float x[kRows * kCols];  // row-major, the whole tile
};

namespace detail {

inline float element(float v) { return v; }
inline float element(__half v) { return __half2float(v); }
inline float element(__nv_bfloat16 v) { return __bfloat162float(v); }

// The warp meets here: every lane must call with the same pointer and stride (a hypercube of xor shuffles
// compares every lane with the others), and the alignment rules of the warp matrix functions must hold.
inline void warp_collective(const char* what, const void* ptr, unsigned ldm, size_t element_bytes) {
  const uint64_t key = reinterpret_cast<uintptr_t>(ptr) ^ (static_cast<uint64_t>(ldm) << 48);
  for (int offset = 1; offset < bnbx::emu::kWarp; offset *= 2) {
    if (__shfl_xor_sync(0xffffffffu, key, offset) != key) {
      bnbx::emu::fail(std::string(what) + ": pointer or stride differs between the lanes of a warp");
    }
  }
  if (reinterpret_cast<uintptr_t>(ptr) % 32 != 0) bnbx::emu::fail(std::string(what) + ": tile not 256-bit aligned");
  if (ldm * element_bytes % 16 != 0) bnbx::emu::fail(std::string(what) + ": stride not a multiple of 16 bytes");
}

inline void warp_collective() {  // an operation without memory: only the whole warp is checked
  for (int offset = 1; offset < bnbx::emu::kWarp; offset *= 2) (void)__shfl_xor_sync(0xffffffffu, 0, offset);
}

}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout>
inline void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, float value) {
  detail::warp_collective();
  for (float& v : f.x) v = value;
}

// matrix_a / matrix_b: the layout is part of the fragment's type.
template <typename Use, int M, int N, int K, typename T, typename Layout>
inline void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const T* ptr, unsigned ldm) {
  using F = fragment<Use, M, N, K, T, Layout>;
  static_assert(std::is_same_v<Layout, row_major> || std::is_same_v<Layout, col_major>);
  detail::warp_collective("load_matrix_sync", ptr, ldm, sizeof(T));
  for (int r = 0; r < F::kRows; ++r) {
    for (int c = 0; c < F::kCols; ++c) {
      const size_t at = std::is_same_v<Layout, row_major> ? size_t(r) * ldm + c : size_t(c) * ldm + r;
      f.x[r * F::kCols + c] = detail::element(ptr[at]);
    }
  }
}

template <int M, int N, int K>
inline void store_matrix_sync(float* ptr, const fragment<accumulator, M, N, K, float>& f, unsigned ldm,
                              layout_t layout) {
  detail::warp_collective("store_matrix_sync", ptr, ldm, sizeof(float));
  for (int r = 0; r < M; ++r) {
    for (int c = 0; c < N; ++c) {
      ptr[layout == mem_row_major ? size_t(r) * ldm + c : size_t(c) * ldm + r] = f.x[r * N + c];
    }
  }
}

// d = a @ b + c, fp32 sums; d may be c.
template <int M, int N, int K, typename T, typename LayoutA, typename LayoutB>
inline void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LayoutA>& a,
                     const fragment<matrix_b, M, N, K, T, LayoutB>& b, const fragment<accumulator, M, N, K, float>& c) {
  detail::warp_collective();
  float sums[M * N];
  for (int i = 0; i < M; ++i) {
    for (int j = 0; j < N; ++j) {
      float sum = c.x[i * N + j];
      for (int k = 0; k < K; ++k) sum += a.x[i * K + k] * b.x[k * N + j];
      sums[i * N + j] = sum;
    }
  }
  for (int i = 0; i < M * N; ++i) d.x[i] = sums[i];
}

}  // namespace nvcuda::wmma
