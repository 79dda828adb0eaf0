// gemm_4bit with AMX (bf16 inputs), included by gemm_4bit_impl.h in the avx512 unit only. The functions carry
// their own target attribute (AMX-TILE, AMX-BF16, AVX512-BF16); the host calls them only after
// cpu_has_amx() and cpu_has_avx512_bf16() (cpu/cpu_features.h).
//
// out^T = W x^T with the weight as AMX's A operand: a block of 32 rows of W is dequantized (the whole row,
// code * absmax rounded once to bf16, exactly dequantize_4bit's bf16 values) into a per-thread scratch
// buffer, so no more than 32 rows of W are ever dense; x is reformatted once per call into the pair-
// interleaved ("VNNI") layout AMX wants for B. Each step multiplies two 16 x 32 A tiles by two 32 x 16 B
// tiles into four 16 x 16 fp32 accumulators, over the whole K, so the product is fp32-accumulated. The
// accumulators leave as bf16, the bias added in fp32 first: one rounding, no fp32 copy of the output.
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

// 16 whole rows of x in the group order (amx_group_order(K, blocksize)) -> their Kp / 32 = K / 32 tiles. Word j of
// step t of a group is element 4j + q(t) (amx_column): two vpermt2w (words 0-15 come from the group's first 64
// elements, words 16-31 from the others) and a blend per step and row; then each tile is a 16 x 16 transpose of
// word pairs, one gather per tile row.
BNBX_AMX_TARGET static void pack_x_rows_groups(const uint16_t* x, int64_t K, uint16_t* out) {
  __m512i index[4];  // word j of step t: element amx_column(32t + j) of the group, within its 64-word half
  for (int t = 0; t < 4; ++t) {
    alignas(64) uint16_t words[32];
    for (int j = 0; j < 32; ++j) words[j] = static_cast<uint16_t>(amx_column(32 * t + j, true) & 63);
    index[t] = _mm512_load_si512(words);
  }
  const __m512i row_starts = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                                _mm512_set1_epi32(16));
  alignas(64) uint32_t steps[4][16][16];  // [step of the group][row][word pair]
  for (int64_t g = 0; g < K / 128; ++g) {
    for (int r = 0; r < 16; ++r) {
      const uint16_t* src = x + r * K + g * 128;
      const __m512i a = _mm512_loadu_si512(src), b = _mm512_loadu_si512(src + 32);
      const __m512i c = _mm512_loadu_si512(src + 64), d = _mm512_loadu_si512(src + 96);
      for (int t = 0; t < 4; ++t) {
        const __m512i first = _mm512_permutex2var_epi16(a, index[t], b);
        const __m512i second = _mm512_permutex2var_epi16(c, index[t], d);
        _mm512_store_si512(steps[t][r], _mm512_mask_blend_epi16(0xffff0000u, first, second));
      }
    }
    for (int t = 0; t < 4; ++t) {
      uint16_t* tile = out + (g * 4 + t) * 512;
      for (int pair = 0; pair < 16; ++pair)
        _mm512_storeu_si512(tile + pair * 32, _mm512_i32gather_epi32(row_starts, &steps[t][0][pair], 4));
    }
  }
}

// x bf16 [M, K] -> [Mp/16][Kp/32][16 pairs][16 rows][2], zero-padded to Mp (multiple of 16) and Kp (of 32), its
// columns in the order the weight is dequantized in (amx_column); the chunks of 16 rows [c_begin, c_end).
BNBX_AMX_TARGET static void pack_x_amx(const uint16_t* x, int64_t M, int64_t K, int64_t Mp, int64_t Kp,
                                       int64_t blocksize, uint16_t* out, int64_t c_begin, int64_t c_end) {
  const bool group_order = amx_group_order(K, blocksize);
  const int64_t steps = Kp / 32;
  for (int64_t c = c_begin; c < std::min(c_end, Mp / 16); ++c) {
    if (group_order && c * 16 + 16 <= M) {
      pack_x_rows_groups(x + c * 16 * K, K, out + c * steps * 512);
      continue;
    }
    for (int64_t s = 0; s < steps; ++s) {
      uint16_t* tile = out + (c * steps + s) * 512;
      for (int64_t r = 0; r < 16; ++r) {
        const int64_t m = c * 16 + r;
        for (int64_t j = 0; j < 32; ++j) {
          const int64_t k = s * 32 + j;
          tile[(j / 2) * 32 + r * 2 + j % 2] = (m < M && k < K) ? x[m * K + amx_column(k, group_order)] : 0;
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

// Where the dequantized weight goes: element (r, k) of the 32 rows at base + (k / 32 - k0 / 32) * step_stride +
// r * row_stride + k % 32. Tile layout (step_stride 1024, row_stride 32): each step's 32 x 32 values one
// contiguous 2 KB run, so a tile is 1 KB at a 64-byte stride (rows of W a whole Kp apart would put all 16 rows
// of a tile in one L1 set, and its loads would wait on L2).
struct TileRows {
  uint16_t* base;
  int64_t k0;
  int64_t step_stride = 1024;
  int64_t row_stride = 32;
  // k and k0 are never negative: shifts, not signed divisions
  uint16_t* at(int64_t r, int64_t k) const {
    return base + ((k >> 5) - (k0 >> 5)) * step_stride + r * row_stride + (k & 31);
  }
};

// Columns [k0, k1) (multiples of 32, k1 <= Kp) of rows [n0, n0 + 32) of W as bf16 into dst (zeros past N and K).
BNBX_AMX_TARGET static void dequantize_rows_bf16(const uint8_t* packed, int64_t K, int shift, const float table[16],
                                                 int64_t n0, int64_t N, const float* row_scales, int64_t stride,
                                                 int64_t k0, int64_t k1, TileRows dst) {
  const __m512 codes = _mm512_loadu_ps(table);
  for (int64_t r = 0; r < kAmxRows; ++r) {
    const int64_t n = n0 + r;
    if (n >= N) {
      for (int64_t k = k0; k < k1; k += 32) std::memset(dst.at(r, k), 0, 32 * sizeof(uint16_t));
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
        _mm512_storeu_si512(dst.at(r, k), _mm512_permutexvar_epi16(index, lut));
      }
    } else {
      for (int64_t k = k0; k < k_end; ++k) {
        const int64_t e = n * K + k;
        const uint8_t byte = packed[e >> 1];
        const int q = (e & 1) ? (byte & 0x0f) : (byte >> 4);
        *dst.at(r, k) = float_to_bf16(table[q] * scales[(e >> shift) - first]);
      }
    }
    for (int64_t k = std::max(k0, K); k < k1; ++k) *dst.at(r, k) = 0;
  }
}

// dequantize_rows_bf16 when amx_group_order(K, blocksize), in that column order. Per group (64 bytes, 32 words):
// step t is one 16-bit shift by 4t and one vpermw of a 32-entry bf16 table, code * absmax rounded once to bf16
// (dequantize_4bit's values): words 0-15 of a step lie in the group's first 64 elements, words 16-31 in the
// others, so with blocks of 64 the table holds the first block's 16 values then the second's, and bit 4 of the
// index is set on words 16-31 (vpermw reads 5 bits); with larger blocks both halves are the block's values.
BNBX_AMX_TARGET static void dequantize_rows_groups(const uint8_t* packed, int64_t K, int shift, const float table[16],
                                                   int64_t n0, int64_t N, const float* row_scales, int64_t stride,
                                                   int64_t k0, int64_t k1, TileRows dst) {
  const __m512 codes = _mm512_loadu_ps(table);
  const __m512i nibble = _mm512_set1_epi16(15);
  const __m512i upper = _mm512_maskz_set1_epi16(0xffff0000u, 16);  // 16 in words 16-31
  const bool two_blocks = shift == 6;                              // blocksize 64
  const bool whole_rows = k0 == 0 && k1 >= K;
  for (int64_t r = 0; r < kAmxRows; ++r) {
    const int64_t n = n0 + r;
    if (n >= N) {
      for (int64_t k = k0; k < k1; k += 32) std::memset(dst.at(r, k), 0, 32 * sizeof(uint16_t));
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
      uint16_t* group = dst.at(r, k);
      for (int t = 0; t < 4; ++t) {
        __m512i index = _mm512_srli_epi16(bytes, 4 * t);
        if (two_blocks) index = _mm512_ternarylogic_epi32(index, nibble, upper, 0xea);  // (index & 15) | upper
        _mm512_storeu_si512(group + t * dst.step_stride, _mm512_permutexvar_epi16(index, lut));
      }
    }
  }
}

using DequantizeRows = void (*)(const uint8_t*, int64_t, int, const float*, int64_t, int64_t, const float*, int64_t,
                                int64_t, int64_t, TileRows);

// Where gemm_amx writes: out bf16 [M, N] = the fp32 sums + bias (fp32 [N] or nullptr), rounded once.
struct AmxOutput {
  uint16_t* out;
  const float* bias;
  int64_t M, N;
};

// rows[i] -> rows[i] holds column i of the 16 x 16 matrix the rows were: four rounds of 16 shuffles.
BNBX_AMX_TARGET static inline void transpose_16x16(__m512 rows[16]) {
  __m512 pairs[16];  // lane L of pairs[2i] / [2i + 1]: columns 4L, 4L+1 / 4L+2, 4L+3 of rows 2i and 2i+1, interleaved
  for (int i = 0; i < 8; ++i) {
    pairs[2 * i] = _mm512_unpacklo_ps(rows[2 * i], rows[2 * i + 1]);
    pairs[2 * i + 1] = _mm512_unpackhi_ps(rows[2 * i], rows[2 * i + 1]);
  }
  __m512 quads[16];  // lane L of quads[4i + c]: column 4L + c of rows 4i .. 4i+3
  for (int i = 0; i < 4; ++i)
    for (int h = 0; h < 2; ++h) {
      quads[4 * i + 2 * h] = _mm512_shuffle_ps(pairs[4 * i + h], pairs[4 * i + 2 + h], 0x44);
      quads[4 * i + 2 * h + 1] = _mm512_shuffle_ps(pairs[4 * i + h], pairs[4 * i + 2 + h], 0xee);
    }
  for (int c = 0; c < 4; ++c) {  // a 4 x 4 transpose of 128-bit lanes per c: column 4L + c gathers lane L of each i
    const __m512 low01 = _mm512_shuffle_f32x4(quads[c], quads[4 + c], 0x44);
    const __m512 high01 = _mm512_shuffle_f32x4(quads[c], quads[4 + c], 0xee);
    const __m512 low23 = _mm512_shuffle_f32x4(quads[8 + c], quads[12 + c], 0x44);
    const __m512 high23 = _mm512_shuffle_f32x4(quads[8 + c], quads[12 + c], 0xee);
    rows[c] = _mm512_shuffle_f32x4(low01, low23, 0x88);
    rows[4 + c] = _mm512_shuffle_f32x4(low01, low23, 0xdd);
    rows[8 + c] = _mm512_shuffle_f32x4(high01, high23, 0x88);
    rows[12 + c] = _mm512_shuffle_f32x4(high01, high23, 0xdd);
  }
}

// acc [Mp / 16][2][16][16] (x chunk of 16 rows, W half, row of W, row of x) -> rows m < M of out, columns
// [n0, n0 + 32) clipped to N: each tile transposed in registers, then per row of x one store of 16 consecutive
// outputs (16 gathers down the tile's columns measured 20% of a 512 x 2816 x 1024 product on one core).
BNBX_AMX_TARGET static void store_block(const float* acc, int64_t Mp, int64_t n0, const AmxOutput& o) {
  for (int64_t c = 0; c < Mp / 16; ++c)
    for (int h = 0; h < 2; ++h) {
      const float* tile = acc + (c * 2 + h) * 256;
      const int64_t nb = n0 + 16 * h, mb = c * 16;
      if (nb >= o.N) continue;
      const __mmask16 valid = static_cast<__mmask16>((1u << std::min<int64_t>(16, o.N - nb)) - 1u);
      const __m512 bias = o.bias != nullptr ? _mm512_maskz_loadu_ps(valid, o.bias + nb) : _mm512_setzero_ps();
      __m512 rows[16];
      for (int r = 0; r < 16; ++r) rows[r] = _mm512_loadu_ps(tile + r * 16);
      transpose_16x16(rows);
      for (int64_t j = 0; j < 16 && mb + j < o.M; ++j) {
        const __m256bh rounded = _mm512_cvtneps_pbh(_mm512_add_ps(rows[j], bias));
        _mm256_mask_storeu_epi16(o.out + (mb + j) * o.N + nb, valid, reinterpret_cast<const __m256i&>(rounded));
      }
    }
}

// One step of 32 columns: rows 0-15 and 16-31 of W (w, w_stride values a row) times the tiles of x's first 16
// rows (x0) and, when pair, of the next 16 (x1), into accumulators 0-3 (2 * W half + x half).
BNBX_AMX_TARGET __attribute__((always_inline)) inline void tile_step(const uint16_t* w, int64_t w_stride,
                                                                     const uint16_t* x0, const uint16_t* x1,
                                                                     bool pair) {
  _tile_loadd(4, w, w_stride * 2);
  _tile_loadd(5, w + 16 * w_stride, w_stride * 2);
  _tile_loadd(6, x0, 64);
  _tile_dpbf16ps(0, 4, 6);
  _tile_dpbf16ps(2, 5, 6);
  if (pair) {
    _tile_loadd(7, x1, 64);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(3, 5, 7);
  }
}

// Mp <= 32: the accumulators stay in the tiles over all of K, so W is dequantized in chunks of kChunk columns
// that stay in L1 right before they are multiplied. wbuf: 32 * min(kChunk, Kp) bf16.
BNBX_AMX_TARGET static void gemm_amx_few_rows(const uint16_t* x, int64_t M, int64_t Mp, int64_t K, int64_t Kp,
                                              const uint8_t* packed, int shift, const float table[16],
                                              DequantizeRows dequantize, const AmxOutput& out, int64_t block_begin,
                                              int64_t block_end, uint16_t* wbuf, float* row_scales,
                                              const Absmax4bit& absmax) {
  constexpr int64_t kChunk = 256;
  const int64_t w_stride = std::min(kChunk, Kp);  // wbuf holds 32 * Kp values
  const int64_t N = out.N;
  alignas(64) float acc[4][16][16];
  const int64_t steps = Kp / 32;
  const int64_t scale_stride = (K >> shift) + 2;
  const bool pair = Mp == 32;  // else 16 rows of x
  const uint16_t* x0 = x;
  const uint16_t* x1 = x0 + steps * 512;
  for (int64_t b = block_begin; b < block_end; ++b) {
    const int64_t n0 = b * kAmxRows;
    const int64_t next_rows = std::max<int64_t>(0, std::min(N, n0 + 2 * kAmxRows) - (n0 + kAmxRows));
    const int64_t next_bytes = next_rows * K / 2;
    const uint8_t* next_block = packed + (n0 + kAmxRows) * K / 2;
    const int64_t next_lines_per_step = next_bytes > 0 ? ceil_div(next_bytes, 64 * steps) : 0;
    decode_row_scales(absmax, K, shift, n0, N, row_scales, scale_stride);
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t s = 0; s < steps; ++s) {
      const int64_t k = s * 32;
      if (k % kChunk == 0)
        dequantize(packed, K, shift, table, n0, N, row_scales, scale_stride, k, std::min(Kp, k + kChunk),
                   TileRows{wbuf, k, 32, w_stride});
      const uint16_t* w = wbuf + k % kChunk;
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
            _mm_prefetch(reinterpret_cast<const char*>(packed + ((n0 + r) * K + next_k) / 2 + 64 * line), _MM_HINT_T0);
      tile_step(w, w_stride, x0 + s * 512, x1 + s * 512, pair);
    }
    // acc as store_block reads it: (x chunk, W half)
    _tile_stored(0, acc[0], 64);
    _tile_stored(2, acc[1], 64);
    _tile_stored(1, acc[2], 64);
    _tile_stored(3, acc[3], 64);
    store_block(&acc[0][0][0], Mp, n0, out);
  }
}

// Mp > 32: the block of 32 rows of W is dequantized whole (32 x Kp, in L2, one contiguous run of packed bytes)
// and multiplied by every 32 rows of x, the accumulators in the tiles over all of K. (Dequantizing the next
// block a row at a time in between the tile products measured no faster: the two do not overlap.) wbuf:
// 32 * Kp bf16; acc: Mp * 32 floats.
BNBX_AMX_TARGET static void gemm_amx_many_rows(const uint16_t* x, int64_t M, int64_t Mp, int64_t K, int64_t Kp,
                                               const uint8_t* packed, int shift, const float table[16],
                                               DequantizeRows dequantize, const AmxOutput& out, int64_t block_begin,
                                               int64_t block_end, uint16_t* wbuf, float* row_scales, float* acc,
                                               const Absmax4bit& absmax) {
  const int64_t N = out.N;
  const int64_t steps = Kp / 32;
  const int64_t scale_stride = (K >> shift) + 2;
  for (int64_t b = block_begin; b < block_end; ++b) {
    const int64_t n0 = b * kAmxRows;
    decode_row_scales(absmax, K, shift, n0, N, row_scales, scale_stride);
    dequantize(packed, K, shift, table, n0, N, row_scales, scale_stride, 0, Kp, TileRows{wbuf, 0});
    for (int64_t m0 = 0; m0 < Mp; m0 += 32) {
      const bool pair = m0 + 32 <= Mp;  // else one last chunk of 16 rows of x
      const uint16_t* x0 = x + (m0 / 16) * steps * 512;
      const uint16_t* x1 = x0 + steps * 512;
      float* c0 = acc + (m0 / 16) * 512;  // (x chunk, W half) tiles
      float* c1 = c0 + 512;
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t s = 0; s < steps; ++s) {
        tile_step(wbuf + s * 1024, 32, x0 + s * 512, x1 + s * 512, pair);
      }
      _tile_stored(0, c0, 64);
      _tile_stored(2, c0 + 256, 64);
      if (pair) {
        _tile_stored(1, c1, 64);
        _tile_stored(3, c1 + 256, 64);
      }
    }
    store_block(acc, Mp, n0, out);
  }
}

// out[m * N + n] = bf16(sum_k x[m, k] * bf16(W[n, k]) + bias[n]) for the row blocks [block_begin, block_end) of
// 32 rows of W and every m < M. x as pack_x_amx wrote it; wbuf, row_scales and acc are scratch (sizes in
// gemm_4bit.h).
BNBX_AMX_TARGET static void gemm_amx(const uint16_t* x, int64_t M, int64_t Mp, int64_t K, int64_t Kp,
                                     const uint8_t* packed, const Absmax4bit& absmax, int64_t blocksize,
                                     QuantType quant_type, uint16_t* out, const float* bias, int64_t N,
                                     int64_t block_begin, int64_t block_end, uint16_t* wbuf, float* row_scales,
                                     float* acc) {
  alignas(64) float table[16];
  fill_code_table(quant_type, table);
  AmxTileConfig config{};
  config.palette = 1;
  for (int t = 0; t < 8; ++t) {
    config.rows[t] = 16;
    config.colsb[t] = 64;
  }
  _tile_loadconfig(&config);
  const int shift = log2_of(blocksize);
  const AmxOutput output{out, bias, M, N};
  const DequantizeRows dequantize = amx_group_order(K, blocksize) ? dequantize_rows_groups : dequantize_rows_bf16;
  if (Mp <= 32)
    gemm_amx_few_rows(x, M, Mp, K, Kp, packed, shift, table, dequantize, output, block_begin, block_end, wbuf,
                      row_scales, absmax);
  else
    gemm_amx_many_rows(x, M, Mp, K, Kp, packed, shift, table, dequantize, output, block_begin, block_end, wbuf,
                       row_scales, acc, absmax);
  _tile_release();
}
