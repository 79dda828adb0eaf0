// gemm_4bit GEMV with AVX512-BF16 dot products (bf16 inputs), included by gemm_4bit_impl.h in the avx512 unit
// only. The functions carry their own target attribute; the host calls them only after cpu_has_avx512_bf16().
//
// Per group of 128 elements (64 packed bytes = 32 words, word j holding elements 4j .. 4j+3 with element
// 4j + q(t), q = 1, 0, 3, 2, in bits 4t .. 4t+3): vpermw reads the low 5 bits of each word, so one 16-bit
// shift by 4t and one vpermw of the 16 codes (as bf16, stored twice so bit 4 does not matter) give the 32
// weights of step t, and vdpbf16ps multiplies them with x (bf16, packed in the same order by pack_a_bf16)
// in pairs into 16 fp32 lanes; lane i sums elements 8i .. 8i+7, the same lane-to-block map as the fp32
// path. Each block's partial sum is scaled by its fp32 absmax once, in fp32. The only differences from the
// fp32 path: the 16 code values are rounded to bf16 (relative error <= 2^-9, as dequantizing to bf16 does)
// and vdpbf16ps treats subnormal bf16 inputs as zero.
#pragma once

#define BNBX_BF16_TARGET __attribute__((target("avx512bf16,avx512bw,avx512vl,avx512f")))

// Elements per group of the bf16 layout.
constexpr int64_t kGroupBf16 = 128;

// x bf16 [M, K] (K % 128 == 0) -> the order gemv_bf16 reads: group g, step t, word w = x[128g + 4w + q(t)].
static void pack_a_bf16(const uint16_t* x, int64_t M, int64_t K, uint16_t* out) {
  static constexpr int kStepElement[4] = {1, 0, 3, 2};
  for (int64_t base = 0; base < M * K; base += kGroupBf16)
    for (int64_t t = 0; t < 4; ++t)
      for (int64_t w = 0; w < 32; ++w) out[base + t * 32 + w] = x[base + 4 * w + kStepElement[t]];
}

// kRows rows of x against rows [n_begin, n_end) of W, scales (fp32 absmax of the blocks of those rows,
// starting with block (n_begin * K) >> shift) already decoded.
template <int kRows>
BNBX_BF16_TARGET static void gemv_bf16_rows(const uint16_t* x, int64_t K, const uint8_t* packed, int64_t blocksize,
                                            const __m512i table, const float* scales, float* out, int64_t N,
                                            int64_t n_begin, int64_t n_end) {
  const int64_t groups = K / kGroupBf16;
  const int64_t blocks_per_group = blocksize < kGroupBf16 ? kGroupBf16 / blocksize : 1;
  const __m512i lane_block = lane_blocks(blocksize < kGroupBf16 ? blocksize / 8 : kLanes);
  const int shift = log2_of(blocksize);
  const int64_t first_block = (n_begin * K) >> shift;
  for (int64_t n = n_begin; n < n_end; ++n) {
    __m512 total[kRows];
    for (int r = 0; r < kRows; ++r) total[r] = _mm512_setzero_ps();
    const uint8_t* row = packed + n * (K / 2);
    for (int64_t g = 0; g < groups; ++g) {
      // 8 KiB ahead on the thread's contiguous run of rows (the hardware prefetcher alone leaves the core waiting)
      _mm_prefetch(reinterpret_cast<const char*>(row + g * 64 + 8192), _MM_HINT_T0);
      const __m512i bytes = _mm512_loadu_si512(row + g * 64);
      __m512 part[kRows];
      for (int r = 0; r < kRows; ++r) part[r] = _mm512_setzero_ps();
      const uint16_t* a = x + g * kGroupBf16;
      for (int t = 0; t < 4; ++t) {
        const __m512i w = _mm512_permutexvar_epi16(_mm512_srli_epi16(bytes, 4 * t), table);
        for (int r = 0; r < kRows; ++r)
          part[r] = _mm512_dpbf16_ps(part[r], reinterpret_cast<__m512bh>(w),
                                     reinterpret_cast<__m512bh>(_mm512_loadu_si512(a + r * K + t * 32)));
      }
      const float* s = scales + (((n * K + g * kGroupBf16) >> shift) - first_block);
      const __m512 scale = blocks_per_group == 1 ? _mm512_set1_ps(s[0]) : lane_scales(s, blocks_per_group, lane_block);
      for (int r = 0; r < kRows; ++r) total[r] = _mm512_fmadd_ps(part[r], scale, total[r]);
    }
    for (int r = 0; r < kRows; ++r) out[r * N + n] = _mm512_reduce_add_ps(total[r]);
  }
}

// out[m * N + n] = sum_k x[m, k] * W[n, k] for n in [n_begin, n_end), m < M; x as pack_a_bf16 wrote it
// (K % 128 == 0, blocksize a power of two >= 16).
BNBX_BF16_TARGET static void gemv_bf16(const uint16_t* x, int64_t M, int64_t K, const uint8_t* packed,
                                       const Absmax4bit& absmax, int64_t blocksize, QuantType quant_type, float* out,
                                       int64_t N, int64_t n_begin, int64_t n_end) {
  alignas(64) float codes[16];
  fill_code_table(quant_type, codes);
  alignas(64) uint16_t codes_bf16[32];
  for (int q = 0; q < 32; ++q) codes_bf16[q] = float_to_bf16(codes[q & 15]);
  const __m512i table = _mm512_load_si512(codes_bf16);
  const int shift = log2_of(blocksize);
  // Rows of W in chunks whose block scales are decoded together (vectorised) into a small buffer.
  constexpr int64_t kChunk = 16;
  std::vector<float> scales(static_cast<size_t>(((kChunk * K) >> shift) + 2));
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kChunk) {
    const int64_t n1 = std::min(n_end, n0 + kChunk);
    decode_absmax(absmax, (n0 * K) >> shift, ((n1 * K - 1) >> shift) + 1, scales.data());
    int64_t m = 0;
    for (; m + 4 <= M; m += 4)
      gemv_bf16_rows<4>(x + m * K, K, packed, blocksize, table, scales.data(), out + m * N, N, n0, n1);
    switch (M - m) {
      case 3:
        gemv_bf16_rows<3>(x + m * K, K, packed, blocksize, table, scales.data(), out + m * N, N, n0, n1);
        break;
      case 2:
        gemv_bf16_rows<2>(x + m * K, K, packed, blocksize, table, scales.data(), out + m * N, N, n0, n1);
        break;
      case 1:
        gemv_bf16_rows<1>(x + m * K, K, packed, blocksize, table, scales.data(), out + m * N, N, n0, n1);
        break;
      default:
        break;
    }
  }
}
