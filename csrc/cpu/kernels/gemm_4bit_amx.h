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

// x bf16 [M, K] -> [Mp/16][Kp/32][16 pairs][16 rows][2], zero-padded to Mp (multiple of 16) and Kp (of 32).
static void pack_x_amx(const uint16_t* x, int64_t M, int64_t K, int64_t Mp, int64_t Kp, uint16_t* out) {
  const int64_t steps = Kp / 32;
  for (int64_t c = 0; c < Mp / 16; ++c) {
    for (int64_t s = 0; s < steps; ++s) {
      uint16_t* tile = out + (c * steps + s) * 512;
      for (int64_t pair = 0; pair < 16; ++pair) {
        for (int64_t r = 0; r < 16; ++r) {
          const int64_t m = c * 16 + r;
          for (int64_t j = 0; j < 2; ++j) {
            const int64_t k = s * 32 + 2 * pair + j;
            tile[pair * 32 + r * 2 + j] = (m < M && k < K) ? x[m * K + k] : 0;
          }
        }
      }
    }
  }
}

// Rows [n0, n0 + 32) of W as bf16 into wbuf [32][Kp] (zeros past N and K).
BNBX_AMX_TARGET static void dequantize_rows_bf16(const uint8_t* packed, const Absmax4bit& absmax, int64_t K,
                                                 int64_t Kp, int64_t blocksize, const float table[16], int64_t n0,
                                                 int64_t N, uint16_t* wbuf, float* row_scales) {
  const int shift = log2_of(blocksize);
  const __m512 codes = _mm512_loadu_ps(table);
  for (int64_t r = 0; r < kAmxRows; ++r) {
    const int64_t n = n0 + r;
    uint16_t* dst = wbuf + r * Kp;
    if (n >= N) {
      std::memset(dst, 0, static_cast<size_t>(Kp) * sizeof(uint16_t));
      continue;
    }
    const int64_t first = (n * K) >> shift;
    decode_absmax(absmax, first, ((n * K + K - 1) >> shift) + 1, row_scales);
    if (K % 32 == 0) {
      // 32 elements (16 bytes) at a time, all inside one block: a 16-entry bf16 table of code * absmax for
      // the block, looked up with vpermw at word indices (high nibble, low nibble) = (element 2j, 2j+1).
      const uint8_t* row = packed + n * K / 2;
      int64_t current = -1;
      __m512i lut = _mm512_setzero_si512();
      for (int64_t k = 0; k < K; k += 32) {
        const int64_t block = ((n * K + k) >> shift) - first;
        if (block != current) {
          current = block;
          const __m256bh values = _mm512_cvtneps_pbh(_mm512_mul_ps(codes, _mm512_set1_ps(row_scales[block])));
          lut = _mm512_castsi256_si512(reinterpret_cast<const __m256i&>(values));
        }
        const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k / 2)));
        const __m512i index = _mm512_or_si512(_mm512_srli_epi32(bytes, 4),
                                              _mm512_slli_epi32(_mm512_and_si512(bytes, _mm512_set1_epi32(15)), 16));
        _mm512_storeu_si512(dst + k, _mm512_permutexvar_epi16(index, lut));
      }
    } else {
      for (int64_t k = 0; k < K; ++k) {
        const int64_t e = n * K + k;
        const uint8_t byte = packed[e >> 1];
        const int q = (e & 1) ? (byte & 0x0f) : (byte >> 4);
        dst[k] = float_to_bf16(table[q] * row_scales[(e >> shift) - first]);
      }
    }
    for (int64_t k = K; k < Kp; ++k) dst[k] = 0;
  }
}

// out[m * N + n] = sum_k x[m, k] * bf16(W[n, k]) for the row blocks [block_begin, block_end) of 32 rows of W
// and every m < M. x as pack_x_amx wrote it; wbuf: 32 * Kp bf16, row_scales: Kp / 32 + 2 floats (scratch).
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
  const int64_t steps = Kp / 32;
  const int64_t w_stride = Kp * 2;
  for (int64_t b = block_begin; b < block_end; ++b) {
    const int64_t n0 = b * kAmxRows;
    dequantize_rows_bf16(packed, absmax, K, Kp, blocksize, table, n0, N, wbuf, row_scales);
    // While the tiles multiply, prefetch the next block's packed bytes (memory would otherwise idle).
    const char* next = reinterpret_cast<const char*>(packed) + (n0 + kAmxRows) * K / 2;
    const int64_t next_bytes = b + 1 < block_end ? std::min<int64_t>(kAmxRows, N - n0 - kAmxRows) * K / 2 : 0;
    const int64_t lines_per_step = ceil_div(ceil_div(next_bytes, 64), steps);
    for (int64_t m0 = 0; m0 < Mp; m0 += 32) {
      const bool pair = m0 + 32 <= Mp;  // else one last chunk of 16 rows of x
      const uint16_t* x0 = x + (m0 / 16) * steps * 512;
      const uint16_t* x1 = x0 + steps * 512;
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t s = 0; s < steps; ++s) {
        if (m0 == 0)
          for (int64_t l = s * lines_per_step; l < (s + 1) * lines_per_step && l * 64 < next_bytes; ++l)
            _mm_prefetch(next + l * 64, _MM_HINT_T0);
        _tile_loadd(4, wbuf + s * 32, w_stride);
        _tile_loadd(5, wbuf + 16 * Kp + s * 32, w_stride);
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
