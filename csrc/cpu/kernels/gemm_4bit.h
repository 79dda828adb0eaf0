// CPU kernel family gemm_4bit: products with a packed 4-bit (NF4/FP4) weight that read the packed bytes
// directly. The weight W [N, K] is stored as bitsandbytes lays it out: the row-major flattening quantized in
// blocks of `blocksize` elements (a block may span rows when K is not a multiple of it), element e in the high
// nibble of byte e/2 when e is even, in the low nibble when odd.
//
// Compiled once per instruction set (bnbx_add_cpu_family(gemm_4bit)); no torch headers here.
#pragma once

#include <cstdint>

#include "../../common/formats.h"

namespace bnbx::cpu {

// Block scales of a packed weight: fp32 per block, or with double quantization uint8 codes decoded as
// nested_code[q] * nested_absmax[block / nested_blocksize] + offset, in fp32 (QuantState.get_absmax's
// arithmetic, so the decoded value is bit-identical to bnbx.dequantize_4bit's).
struct Absmax4bit {
  const float* absmax = nullptr;         // fp32 [blocks]; nullptr when nested
  const uint8_t* absmax_q = nullptr;     // uint8 [blocks] when nested
  const float* nested_absmax = nullptr;  // fp32 [ceil(blocks / nested_blocksize)]
  const float* nested_code = nullptr;    // fp32 [256]
  float offset = 0.0f;
  int64_t nested_blocksize = 256;
};

struct Gemm4bitKernels {
  const char* name;  // "scalar", "avx2" or "avx512"

  // A [M, K] (fp32/fp16/bf16, contiguous) -> fp32 [M, K] in the order `gemv` reads it (this instruction set's
  // layout; a permutation within groups of K, or the natural order).
  void (*pack_a)(FloatType a_type, const void* A, int64_t M, int64_t K, float* out);

  // out[m * N + n] = sum_k A[m, k] * W[n, k] for n in [n_begin, n_end), every m < M, accumulated in fp32;
  // A as pack_a wrote it. Up to 4 rows of A at a time, each block's partial sum is scaled by its absmax once;
  // kBlockA rows at a time (gemm_4bit_impl.h), each weight is code * absmax in fp32 before its products.
  void (*gemv)(const float* A, int64_t M, int64_t K, const uint8_t* packed, const Absmax4bit& absmax, int64_t blocksize,
               QuantType quant_type, float* out, int64_t N, int64_t n_begin, int64_t n_end);

  // out[b - block_begin] = the fp32 absmax of block b, for b in [block_begin, block_end).
  void (*decode_absmax)(const Absmax4bit& absmax, int64_t block_begin, int64_t block_end, float* out);

  // AMX (avx512 table only, nullptr elsewhere; call only when cpu_has_amx() and cpu_has_avx512_bf16()):
  // pack_x_amx: bf16 x [M, K] -> the B-operand layout, zero-padded to Mp (multiple of 16) rows and Kp (of 32),
  // its columns in gemm_amx's order of the weight's columns for this K and blocksize; the chunks of 16 rows
  // [c_begin, c_end).
  void (*pack_x_amx)(const uint16_t* x, int64_t M, int64_t K, int64_t Mp, int64_t Kp, int64_t blocksize, uint16_t* out,
                     int64_t c_begin, int64_t c_end);
  // out bf16 [m * N + n] = sum_k x[m, k] * bf16(W[n, k]) (fp32 accumulation) + bias[n] (fp32, or nullptr),
  // rounded once, for rows of W in the blocks of 32 [block_begin, block_end). Scratch: wbuf 32 * Kp bf16,
  // row_scales 32 * (K / blocksize + 2) floats, acc Mp * 32 floats.
  void (*gemm_amx)(const uint16_t* x, int64_t M, int64_t Mp, int64_t K, int64_t Kp, const uint8_t* packed,
                   const Absmax4bit& absmax, int64_t blocksize, QuantType quant_type, uint16_t* out, const float* bias,
                   int64_t N, int64_t block_begin, int64_t block_end, uint16_t* wbuf, float* row_scales, float* acc);
};

extern const Gemm4bitKernels gemm_4bit_scalar;
extern const Gemm4bitKernels gemm_4bit_avx2;
extern const Gemm4bitKernels gemm_4bit_avx512;

}  // namespace bnbx::cpu
