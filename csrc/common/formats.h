// Storage formats shared by every backend: 4-bit code tables, thresholds, nibble order, the 8-bit dynamic
// map size. Written once here and used by the CPU kernels (all instruction sets) and the CUDA kernels.
//
// Functions here are `static inline`: the CPU kernels include this header in units compiled with different
// instruction sets, and a shared inline definition could be merged across them (see cpu/kernels/quantize_4bit.h).
//
// The values are bitsandbytes' (so bnbx reads and writes its checkpoints byte for byte); the tests compare
// them with tests/reference.py, which derives them independently.
#pragma once

#include <cstdint>

// Every kernel includes this header: refuse fast-math here (CMakeLists.txt also checks the flags), since it
// changes NaN, Inf and subnormal blocks and the bits every backend must agree on.
#if defined(__FAST_MATH__) || defined(__USE_FAST_MATH__)
#error "bnbx: the kernels must be compiled without fast-math (-ffast-math, -Ofast, --use_fast_math)"
#endif

#if defined(__CUDACC__)
#define BNBX_HOST_DEVICE __host__ __device__
#define BNBX_CONSTANT __constant__
#else
#define BNBX_HOST_DEVICE
#define BNBX_CONSTANT
#endif

namespace bnbx {

enum class QuantType : int32_t { kNF4 = 0, kFP4 = 1 };

// Float types the kernels read and write. The CPU instruction-set units use this instead of
// at::ScalarType so that they include no torch headers (see csrc/cpu/kernels/quantize_4bit.h).
enum class FloatType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Packing: byte j of a packed 4-bit tensor holds element 2j in the high nibble and element 2j+1 in the
// low nibble. A missing last element (odd numel) is stored as the code of 0.0.
constexpr int kCodesPerByte = 2;

// Blocksizes: powers of two in [32, 4096] for 4-bit (as bitsandbytes), [32, 16384] for 8-bit blockwise
// (bitsandbytes' CPU path takes large blocks too). bnbx/_formats.py holds the same sets.
constexpr int64_t kMinBlocksize = 32;
constexpr int64_t kMaxBlocksize = 4096;
constexpr int64_t kMaxBlocksize8bit = 16384;

// Double quantization quantizes the fp32 absmax values with the 8-bit dynamic map in blocks of 256.
constexpr int64_t kNestedBlocksize = 256;
constexpr int kDynamicMapSize = 256;

// NF4 code values by nibble: QLoRA's normal-float quantiles, normalised to [-1, 1]
// (bitsandbytes get_4bit_type("nf4")). Seven negative values, an exact 0 (code 7), eight positive.
constexpr float kNF4Values[16] = {
    -1.0f,                  // 0b0000
    -0.6961928009986877f,   // 0b0001
    -0.5250730514526367f,   // 0b0010
    -0.39491748809814453f,  // 0b0011
    -0.28444138169288635f,  // 0b0100
    -0.18477343022823334f,  // 0b0101
    -0.09105003625154495f,  // 0b0110
    0.0f,                   // 0b0111
    0.07958029955625534f,   // 0b1000
    0.16093020141124725f,   // 0b1001
    0.24611230194568634f,   // 0b1010
    0.33791524171829224f,   // 0b1011
    0.44070982933044434f,   // 0b1100
    0.5626170039176941f,    // 0b1101
    0.7229568362236023f,    // 0b1110
    1.0f,                   // 0b1111
};
constexpr uint8_t kNF4ZeroCode = 0b0111;

// NF4 rounding: code = number of thresholds t with x > t (ties go to the lower code). The thresholds are
// the midpoints of neighbouring codes as bitsandbytes' CUDA decision tree writes them (dQuantizeNF4).
constexpr float kNF4Thresholds[15] = {
    -0.8480964004993439f,  -0.6106329262256622f,   -0.4599952697753906f, -0.33967943489551544f, -0.23460740596055984f,
    -0.13791173323988914f, -0.045525018125772476f, 0.03979014977812767f, 0.1202552504837513f,   0.2035212516784668f,
    0.2920137718319893f,   0.3893125355243683f,    0.5016634166240692f,  0.6427869200706482f,   0.8614784181118011f,
};

// FP4 (bitsandbytes' variant, not OCP E2M1): bit 3 is the sign; the 3-bit magnitude codes are
// raw values {0, 0.0625, 8, 12, 4, 6, 2, 3}, normalised by 12 in fp32 (the stored quant_map).
constexpr float kFP4RawMagnitudes[8] = {0.0f, 0.0625f, 8.0f, 12.0f, 4.0f, 6.0f, 2.0f, 3.0f};
constexpr float kFP4Max = 12.0f;
constexpr uint8_t kFP4ZeroCode = 0b0000;

// FP4 rounding on |x|: magnitude bucket = number of thresholds below |x| (bitsandbytes dQuantizeFP4
// pivots); the bucket, in increasing magnitude, maps to the 3-bit code below. Sign bit set when x < 0.
constexpr float kFP4Thresholds[7] = {0.00260417f, 0.0859375f, 0.20833333f, 0.29166667f,
                                     0.4166667f,  0.583333f,  0.8333333f};
constexpr uint8_t kFP4BucketToCode[8] = {0b000, 0b001, 0b110, 0b111, 0b100, 0b101, 0b010, 0b011};

static_assert(sizeof(kNF4Values) == 16 * sizeof(float), "NF4 table has 16 entries");
static_assert(sizeof(kNF4Thresholds) == 15 * sizeof(float), "15 NF4 thresholds");
static_assert(sizeof(kFP4Thresholds) == 7 * sizeof(float), "7 FP4 magnitude thresholds");

// The 16 decoded values of a 4-bit type, as fp32 (the table dequantization multiplies by absmax).
static inline void fill_code_table(QuantType type, float table[16]) {
  for (int q = 0; q < 16; ++q) {
    if (type == QuantType::kNF4) {
      table[q] = kNF4Values[q];
    } else {
      const float magnitude = kFP4RawMagnitudes[q & 7] / kFP4Max;
      table[q] = (q & 8) ? -magnitude : magnitude;
    }
  }
}

static inline uint8_t zero_code(QuantType type) { return type == QuantType::kNF4 ? kNF4ZeroCode : kFP4ZeroCode; }

// Nearest 4-bit code of a value already scaled into [-1, 1]; the plain definition every fast path matches.
BNBX_HOST_DEVICE static inline uint8_t nf4_code(float x) {
  uint8_t code = 0;
  for (int i = 0; i < 15; ++i) code += (x > kNF4Thresholds[i]) ? 1 : 0;
  return code;
}

BNBX_HOST_DEVICE static inline uint8_t fp4_code(float x) {
  const uint8_t sign = (x < 0.0f) ? 0b1000 : 0;
  const float magnitude = x < 0.0f ? -x : x;
  int bucket = 0;
  for (int i = 0; i < 7; ++i) bucket += (magnitude > kFP4Thresholds[i]) ? 1 : 0;
  return static_cast<uint8_t>(kFP4BucketToCode[bucket] | sign);
}

}  // namespace bnbx
