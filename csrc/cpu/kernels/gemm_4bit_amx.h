// gemm_4bit with AMX (bf16 inputs), included by gemm_4bit_impl.h in the avx512 unit only. The functions carry
// their own target attribute (AMX-TILE, AMX-BF16, AVX512-BF16); the host calls them only after
// cpu_has_amx() and cpu_has_avx512_bf16() (cpu/cpu_features.h).
//
// out^T = W x^T with the weight as AMX's A operand: a block of 32 rows of W is dequantized (the whole row,
// code * absmax rounded once to bf16, exactly dequantize_4bit's bf16 values) into a per-thread scratch
// buffer, so no more than 32 rows of W are ever dense; x is reformatted once per call into the pair-
// interleaved ("VNNI") layout AMX wants for B. Each step multiplies two 16 x 32 A tiles by two 32 x 16 B
// tiles into four 16 x 16 fp32 accumulators, over the whole K, so the product is fp32-accumulated.
#pragma once

#define BNBX_AMX_TARGET __attribute__((target("amx-tile,amx-bf16,avx512bf16,avx512bw,avx512vl,avx512f")))

struct alignas(64) AmxTileConfig {
  uint8_t palette;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

constexpr int64_t kAmxRows = 32;  // rows of W (and of x) per block: two tiles of 16

// Whether the fast dequantizer (dequantize_rows_groups) applies: whole groups of 128 elements in one or two blocks.
static inline bool amx_group_order(int64_t K, int64_t blocksize) { return K % 128 == 0 && blocksize >= 64; }

// In the group order, position p of each group of 128 columns holds element 4 (p % 32) + q(p / 32), q = 1, 0, 3, 2
// (64 packed bytes read as 32 words; word j holds elements 4j .. 4j+3, element 4j + q(t) in bits 4t .. 4t+3);
// element p otherwise. Any order of the columns gives the same product as long as x is packed in it too.
static inline int64_t amx_column(int64_t k, bool group_order) {
  static constexpr int64_t kStepElement[4] = {1, 0, 3, 2};
  if (!group_order) return k;
  const int64_t p = k % 128;
  return k - p + 4 * (p % 32) + kStepElement[p / 32];
}

// x bf16 [M, K] -> [Mp/16][Kp/32][16 pairs][16 rows][2], zero-padded to Mp (multiple of 16) and Kp (of 32), its
// columns in the order the weight is dequantized in (amx_column).
static void pack_x_amx(const uint16_t* x, int64_t M, int64_t K, int64_t Mp, int64_t Kp, int64_t blocksize,
                       uint16_t* out) {
  const bool group_order = amx_group_order(K, blocksize);
  const int64_t steps = Kp / 32;
  for (int64_t c = 0; c < Mp / 16; ++c) {
    for (int64_t s = 0; s < steps; ++s) {
      uint16_t* tile = out + (c * steps + s) * 512;
      for (int64_t pair = 0; pair < 16; ++pair) {
        for (int64_t r = 0; r < 16; ++r) {
          const int64_t m = c * 16 + r;
          for (int64_t j = 0; j < 2; ++j) {
            const int64_t k = s * 32 + 2 * pair + j;
            tile[pair * 32 + r * 2 + j] = (m < M && k < K) ? x[m * K + amx_column(k, group_order)] : 0;
          }
        }
      }
    }
  }
}

// Block scales of rows [n0, n0 + 32) of W: row r's blocks start at row_scales + r * stride (stride >= the
// number of blocks a row touches, K / blocksize + 2).
static void decode_row_scales(const Absmax4bit& absmax, int64_t K, int shift, int64_t n0, int64_t N, float* row_scales,
                              int64_t stride) {
  for (int64_t r = 0; r < kAmxRows && n0 + r < N; ++r) {
    const int64_t n = n0 + r;
    decode_absmax(absmax, (n * K) >> shift, ((n * K + K - 1) >> shift) + 1, row_scales + r * stride);
  }
}

// Columns [k0, k1) (multiples of 32, k1 <= Kp) of rows [n0, n0 + 32) of W as bf16 into dst (row stride
// dst_stride elements; zeros past N and K).
BNBX_AMX_TARGET static void dequantize_rows_bf16(const uint8_t* packed, int64_t K, int shift, const float table[16],
                                                 int64_t n0, int64_t N, const float* row_scales, int64_t stride,
                                                 int64_t k0, int64_t k1, uint16_t* dst, int64_t dst_stride) {
  const __m512 codes = _mm512_loadu_ps(table);
  for (int64_t r = 0; r < kAmxRows; ++r) {
    const int64_t n = n0 + r;
    uint16_t* out = dst + r * dst_stride - k0;
    if (n >= N) {
      std::memset(out + k0, 0, static_cast<size_t>(k1 - k0) * sizeof(uint16_t));
      continue;
    }
    const int64_t first = (n * K) >> shift;
    const float* scales = row_scales + r * stride;
    const int64_t k_end = std::min(k1, K);
    if (K % 32 == 0) {
      // 32 elements (16 bytes) at a time, all inside one block: a 16-entry bf16 table of code * absmax for
      // the block, looked up with vpermw at word indices (high nibble, low nibble) = (element 2j, 2j+1).
      const uint8_t* row = packed + n * K / 2;
      int64_t current = -1;
      __m512i lut = _mm512_setzero_si512();
      for (int64_t k = k0; k < k_end; k += 32) {
        const int64_t block = ((n * K + k) >> shift) - first;
        if (block != current) {
          current = block;
          const __m256bh values = _mm512_cvtneps_pbh(_mm512_mul_ps(codes, _mm512_set1_ps(scales[block])));
          lut = _mm512_castsi256_si512(reinterpret_cast<const __m256i&>(values));
        }
        const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k / 2)));
        const __m512i index = _mm512_or_si512(_mm512_srli_epi32(bytes, 4),
                                              _mm512_slli_epi32(_mm512_and_si512(bytes, _mm512_set1_epi32(15)), 16));
        _mm512_storeu_si512(out + k, _mm512_permutexvar_epi16(index, lut));
      }
    } else {
      for (int64_t k = k0; k < k_end; ++k) {
        const int64_t e = n * K + k;
        const uint8_t byte = packed[e >> 1];
        const int q = (e & 1) ? (byte & 0x0f) : (byte >> 4);
        out[k] = float_to_bf16(table[q] * scales[(e >> shift) - first]);
      }
    }
    for (int64_t k = std::max(k0, K); k < k1; ++k) out[k] = 0;
  }
}

// dequantize_rows_bf16 when amx_group_order(K, blocksize), in that column order. Per group (64 bytes, 32 words):
// step t is one 16-bit shift by 4t and one vpermw of a 32-entry bf16 table, code * absmax rounded once to bf16
// (dequantize_4bit's values): words 0-15 of a step lie in the group's first 64 elements, words 16-31 in the
// others, so with blocks of 64 the table holds the first block's 16 values then the second's, and bit 4 of the
// index is set on words 16-31 (vpermw reads 5 bits); with larger blocks both halves are the block's values.
BNBX_AMX_TARGET static void dequantize_rows_groups(const uint8_t* packed, int64_t K, int shift, const float table[16],
                                                   int64_t n0, int64_t N, const float* row_scales, int64_t stride,
                                                   int64_t k0, int64_t k1, uint16_t* dst, int64_t dst_stride) {
  const __m512 codes = _mm512_loadu_ps(table);
  const __m512i nibble = _mm512_set1_epi16(15);
  const __m512i upper = _mm512_maskz_set1_epi16(0xffff0000u, 16);  // 16 in words 16-31
  const bool two_blocks = shift == 6;                              // blocksize 64
  const bool whole_rows = k0 == 0 && k1 >= K;
  for (int64_t r = 0; r < kAmxRows; ++r) {
    const int64_t n = n0 + r;
    uint16_t* out = dst + r * dst_stride - k0;
    if (n >= N) {
      std::memset(out + k0, 0, static_cast<size_t>(k1 - k0) * sizeof(uint16_t));
      continue;
    }
    const int64_t first = (n * K) >> shift;
    const float* scales = row_scales + r * stride;
    const uint8_t* row = packed + n * K / 2;
    for (int64_t k = k0; k < k1; k += 128) {
      // whole rows: the rows are one contiguous run of bytes, fetched a row ahead
      if (whole_rows) _mm_prefetch(reinterpret_cast<const char*>(row + k / 2 + K / 2), _MM_HINT_T0);
      const float* s = scales + (((n * K + k) >> shift) - first);
      const __m512 lo = _mm512_mul_ps(codes, _mm512_set1_ps(s[0]));
      const __m512 hi = two_blocks ? _mm512_mul_ps(codes, _mm512_set1_ps(s[1])) : lo;
      const __m512i lut = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo));
      const __m512i bytes = _mm512_loadu_si512(row + k / 2);
      for (int t = 0; t < 4; ++t) {
        __m512i index = _mm512_srli_epi16(bytes, 4 * t);
        if (two_blocks) index = _mm512_ternarylogic_epi32(index, nibble, upper, 0xea);  // (index & 15) | upper
        _mm512_storeu_si512(out + k + 32 * t, _mm512_permutexvar_epi16(index, lut));
      }
    }
  }
}

// out[m * N + n] = sum_k x[m, k] * bf16(W[n, k]) for the row blocks [block_begin, block_end) of 32 rows of W
// and every m < M. x as pack_x_amx wrote it; scratch: wbuf 32 * Kp bf16, row_scales 32 * (K / blocksize + 2)
// floats.
BNBX_AMX_TARGET static void gemm_amx(const uint16_t* x, int64_t M, int64_t Mp, int64_t K, int64_t Kp,
                                     const uint8_t* packed, const Absmax4bit& absmax, int64_t blocksize,
                                     QuantType quant_type, float* out, int64_t N, int64_t block_begin,
                                     int64_t block_end, uint16_t* wbuf, float* row_scales) {
  alignas(64) float table[16];
  fill_code_table(quant_type, table);
  AmxTileConfig config{};
  config.palette = 1;
  for (int t = 0; t < 8; ++t) {
    config.rows[t] = 16;
    config.colsb[t] = 64;
  }
  _tile_loadconfig(&config);
  alignas(64) float acc[4][16][16];
  const int shift = log2_of(blocksize);
  const int64_t steps = Kp / 32;
  const int64_t scale_stride = (K >> shift) + 2;
  const auto dequantize = amx_group_order(K, blocksize) ? dequantize_rows_groups : dequantize_rows_bf16;
  // With at most 32 rows of x the accumulators stay in the tiles over all of K, so W is dequantized in
  // chunks of kChunk columns that stay in L1 right before they are multiplied; with more rows the block of
  // W is dequantized whole (32 x Kp, in L2) and reused for every 32 rows of x.
  constexpr int64_t kChunk = 256;
  const bool chunked = Mp <= 32;
  const int64_t w_stride = chunked ? std::min(kChunk, Kp) : Kp;  // wbuf holds 32 * Kp values
  for (int64_t b = block_begin; b < block_end; ++b) {
    const int64_t n0 = b * kAmxRows;
    const int64_t next_rows = std::max<int64_t>(0, std::min(N, n0 + 2 * kAmxRows) - (n0 + kAmxRows));
    const int64_t next_bytes = next_rows * K / 2;
    const uint8_t* next_block = packed + (n0 + kAmxRows) * K / 2;
    const int64_t next_lines_per_step = next_bytes > 0 ? ceil_div(next_bytes, 64 * steps) : 0;
    decode_row_scales(absmax, K, shift, n0, N, row_scales, scale_stride);
    if (!chunked) dequantize(packed, K, shift, table, n0, N, row_scales, scale_stride, 0, Kp, wbuf, Kp);
    for (int64_t m0 = 0; m0 < Mp; m0 += 32) {
      const bool pair = m0 + 32 <= Mp;  // else one last chunk of 16 rows of x
      const uint16_t* x0 = x + (m0 / 16) * steps * 512;
      const uint16_t* x1 = x0 + steps * 512;
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t s = 0; s < steps; ++s) {
        const uint16_t* w = wbuf + s * 32;
        if (chunked) {
          const int64_t k = s * 32;
          if (k % kChunk == 0)
            dequantize(packed, K, shift, table, n0, N, row_scales, scale_stride, k, std::min(Kp, k + kChunk), wbuf,
                       w_stride);
          w = wbuf + k % kChunk;
          // the next block of 32 rows (one contiguous run of bytes) into L2, spread over this block's steps, so
          // that its loads never wait on memory
          if (next_lines_per_step > 0)
            for (int64_t l = s * next_lines_per_step; l < (s + 1) * next_lines_per_step; ++l)
              _mm_prefetch(reinterpret_cast<const char*>(next_block + std::min(l * 64, next_bytes - 1)), _MM_HINT_T1);
          // the packed bytes of the next chunk into L1 (the rows are 32 strided streams the hardware
          // prefetcher follows poorly): kChunk / 128 cache lines of 32 / (kChunk / 32) rows per step
          constexpr int64_t kRowsPerStep = kAmxRows * 32 / kChunk, kLinesPerRow = kChunk / 128;
          const int64_t row = (s % (kChunk / 32)) * kRowsPerStep;
          const int64_t next_k = (k / kChunk + 1) * kChunk;
          if (K % 32 == 0 && next_k < K)
            for (int64_t r = row; r < row + kRowsPerStep && n0 + r < N; ++r)
              for (int64_t line = 0; line < kLinesPerRow; ++line)
                _mm_prefetch(reinterpret_cast<const char*>(packed + ((n0 + r) * K + next_k) / 2 + 64 * line),
                             _MM_HINT_T0);
        }
        _tile_loadd(4, w, w_stride * 2);
        _tile_loadd(5, w + 16 * w_stride, w_stride * 2);
        _tile_loadd(6, x0 + s * 512, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(2, 5, 6);
        if (pair) {
          _tile_loadd(7, x1 + s * 512, 64);
          _tile_dpbf16ps(1, 4, 7);
          _tile_dpbf16ps(3, 5, 7);
        }
      }
      _tile_stored(0, acc[0], 64);
      _tile_stored(1, acc[1], 64);
      _tile_stored(2, acc[2], 64);
      _tile_stored(3, acc[3], 64);
      // acc[t][row of W][row of x]: t = 2 * (W half) + (x half)
      for (int t = 0; t < 4; ++t) {
        if (!pair && (t & 1)) continue;
        const int64_t nb = n0 + 16 * (t >> 1);
        const int64_t mb = m0 + 16 * (t & 1);
        for (int64_t i = 0; i < 16 && nb + i < N; ++i)
          for (int64_t j = 0; j < 16 && mb + j < M; ++j) out[(mb + j) * N + nb + i] = acc[t][i][j];
      }
    }
  }
  _tile_release();
}
