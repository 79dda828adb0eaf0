// LLM.int8() CPU kernel family: vector-wise (per row) int8 quantization with outlier columns, the int8 GEMM
// C[M, N] = A[M, K] . B[N, K]^T in int32, and the dequantizing epilogue. Compiled once per instruction set
// from int8_matmul_impl.h (bnbx_add_cpu_family in CMakeLists.txt); no torch headers here (see kernels.h).
//
// The AVX-512 unit also carries AMX-INT8 and AVX512-VNNI GEMMs, compiled with their own target attributes;
// the host calls them only after cpu_has_amx() / cpu_has_avx512_vnni() said yes (null in other units).
#pragma once

#include <cstdint>

#include "../../common/formats.h"

namespace bnbx::cpu {

// The dequantizing epilogue of mm_dequant below, applied by gemm_amx to each accumulator tile as it leaves the
// tile registers, so the int32 product is never written out.
struct Int8Epilogue {
  const float* row_stats;
  const float* col_stats;
  FloatType bias_type;
  const void* bias;  // may be null
  const float* a_out;
  const float* b_out;
  int64_t n_out;
  FloatType out_type;
  void* out;  // [M, N] row-major
  // Optional (gemm_amx packing B itself): the kernel fills b_out[j, n] = float(B[n, gather_cols[j]]) *
  // col_stats[n] * (1/127) for j < n_out and its own rows n, as it packs them (rows then in cache).
  const int64_t* gather_cols;
  float* gather_b_out;
};

struct Int8MatmulKernels {
  const char* name;  // "scalar", "avx2" or "avx512"

  // ORs into mask[K] (one byte per column) a 1 for every column holding |x| >= threshold in rows
  // [row_begin, row_end) of the row-major A[rows, K]; NaN is never an outlier.
  void (*outlier_columns)(FloatType in_type, const void* A, int64_t K, float threshold, uint8_t* mask,
                          int64_t row_begin, int64_t row_end);
  // bitsandbytes' rule per row: stats = max |x| over the row's x with |x| < threshold (every x when
  // threshold == 0), q = round_half_even(x * ((1 / stats) * 127)) (torch's 127 / stats); q = 0 in columns with mask[k]
  // != 0 (mask may be null), for a zero row, and for every x of a row holding NaN or Inf (stats is then NaN / Inf).
  // Row r of q starts at q + r * ldq (ldq >= K; the bytes between K and ldq are left as they are).
  void (*vectorwise_quant)(FloatType in_type, const void* A, int64_t K, float threshold, const uint8_t* mask, int8_t* q,
                           int64_t ldq, float* stats, int64_t row_begin, int64_t row_end);
  // out = float(q) * stats[row] * (1/127) in fp32, bitsandbytes' order of operations.
  void (*vectorwise_dequant)(const int8_t* q, const float* stats, int64_t K, float* out, int64_t row_begin,
                             int64_t row_end);

  // C[M, N] (row-major, leading dimension N) for output columns [n_begin, n_end): exact int32 sums.
  void (*gemm)(const int8_t* A, const int8_t* B, int32_t* C, int64_t M, int64_t N, int64_t K, int64_t n_begin,
               int64_t n_end);
  // Same product with AVX512-VNNI (vpdpbusd on A + 128, corrected by 128 * row sums of B); null outside avx512.
  void (*gemm_vnni)(const int8_t* A, const int8_t* B, int32_t* C, int64_t M, int64_t N, int64_t K, int64_t n_begin,
                    int64_t n_end);
  // AMX-INT8: B is first packed (amx_pack over blocks of 16 rows) into tiles of 64 k x 16 rows in the
  // 4-byte-interleaved layout TDPBSSD takes as its second operand; rows of A (stride lda >= K) are loaded as
  // tiles in place where the a_bytes readable from A allow it (rows past M and bytes past K only meet zeros of
  // packed B, and their sums are never stored), else through a zero-filled copy. n_begin is a multiple of 32.
  // With ep null the int32 sums go to C; with ep they go through the epilogue to ep->out and C is unused.
  // With packed_B null, each 32-row panel of the row-major B is packed just before use into a buffer that stays
  // in cache (no N x K copy; suits one pass over A, M <= 256).
  int64_t (*amx_packed_bytes)(int64_t rows, int64_t K);
  void (*amx_pack)(const int8_t* X, int64_t rows, int64_t K, uint8_t* packed, int64_t block_begin, int64_t block_end);
  void (*gemm_amx)(const int8_t* A, int64_t lda, int64_t a_bytes, const int8_t* B, const uint8_t* packed_B, int32_t* C,
                   int64_t M, int64_t N, int64_t K, int64_t n_begin, int64_t n_end, const Int8Epilogue* ep);

  // out[m, n] = float(C[m, n]) * (row_stats[m] * col_stats[n]) * 6.200124e-05f (1/127^2, bitsandbytes'
  // constant), + sum_j a_out[m, j] * b_out[n, j] (outlier columns, fp32, j < n_out), + float(bias[n]),
  // one rounding to out_type; rows [row_begin, row_end). bias, a_out and b_out may be null.
  void (*mm_dequant)(const int32_t* C, const float* row_stats, const float* col_stats, FloatType bias_type,
                     const void* bias, const float* a_out, const float* b_out, int64_t n_out, FloatType out_type,
                     void* out, int64_t N, int64_t row_begin, int64_t row_end);
};

extern const Int8MatmulKernels int8_matmul_scalar;
extern const Int8MatmulKernels int8_matmul_avx2;
extern const Int8MatmulKernels int8_matmul_avx512;

}  // namespace bnbx::cpu
