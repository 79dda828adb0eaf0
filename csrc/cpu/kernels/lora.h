// CPU kernel family `lora`: the three skinny products of a LoRA adapter (rank r, a few to a few hundred), fused
// with the conversions of its 16-bit inputs and outputs, so an adapter's forward and backward read each activation
// once and write each result once in the caller's dtype. Every sum is accumulated in fp32. The adapter's weights
// arrive as fp32 rows of r: A [r, K] as stored and B^T [r, N].
//
// Compiled once per instruction set (bnbx_add_cpu_family(lora)); no torch headers here.
#pragma once

#include <cstdint>

#include "../../common/formats.h"

namespace bnbx::cpu {

// `outer`'s column ranges start at multiples of this (a whole number of every instruction set's blocks of columns),
// so which columns take the SIMD blocks, and so their results, do not depend on how the host splits them.
constexpr int64_t kLoraColumnChunk = 64;

struct LoraKernels {
  const char* name;  // "scalar", "avx2" or "avx512"

  // out[m * r + j] = scale * sum_k X[m, k] * W[j, k] for the rows m in [m_begin, m_end) and every j < r; X [M, K]
  // contiguous in x_type, W fp32 [r, K]. (The adapter's hidden activation, and its gradient.)
  void (*dot)(FloatType x_type, const void* X, int64_t K, const float* W, int64_t r, float scale, float* out,
              int64_t m_begin, int64_t m_end);

  // Y[m, n] = base[m, n] + sum_j H[m * r + j] * W[j, n], rounded once to y_type, for the rows m in
  // [m_begin, m_end) and every n < N; H fp32 [M, r], W fp32 [r, N], base [M, N] in y_type (nullptr: zero).
  // (The adapter's output added to the base layer's, and the input gradient.)
  void (*expand)(const float* H, int64_t r, const float* W, int64_t N, FloatType y_type, const void* base, void* Y,
                 int64_t m_begin, int64_t m_end);

  // expand with W as lora_B stores it, fp32 [N, r]: Y[m, n] = base[m, n] + sum_j H[m * r + j] * W[n * r + j], each
  // output an r-long dot added to base. For a few rows, where transposing W would cost more than the products.
  void (*expand_rows)(const float* H, int64_t r, const float* W, int64_t N, FloatType y_type, const void* base, void* Y,
                      int64_t m_begin, int64_t m_end);

  // out[i * r + j] = scale * sum_t Q[i * q_row + t * q_step] * V[t * r + j] over t < T in order, for the rows i in
  // [i_begin, i_end) and every j < r; Q in q_type, V fp32 [T, r]. For a few rows of activations, the backward's
  // products with lora_B as stored (t: N's columns) and lora_B's gradient in its own layout (t: the rows), where
  // transposing B and the gradient would cost more than the products.
  void (*accumulate_rows)(FloatType q_type, const void* Q, int64_t q_row, int64_t q_step, int64_t T, const float* V,
                          int64_t r, float scale, float* out, int64_t i_begin, int64_t i_end);

  // out[j * N + n] = sum_m P[m * r + j] * Q[m, n] over every m < M in order, for the columns n in [n_begin, n_end)
  // and every j < r; P fp32 [M, r], Q [M, N] contiguous in q_type; n_begin a multiple of kLoraColumnChunk. (The
  // gradients of A and B.)
  void (*outer)(const float* P, int64_t M, int64_t r, FloatType q_type, const void* Q, int64_t N, float* out,
                int64_t n_begin, int64_t n_end);
};

extern const LoraKernels lora_scalar;
extern const LoraKernels lora_avx2;
extern const LoraKernels lora_avx512;

}  // namespace bnbx::cpu
