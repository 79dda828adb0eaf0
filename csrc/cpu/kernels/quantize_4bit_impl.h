// 4-bit blockwise quantize / dequantize, compiled once per instruction set (see quantize_4bit.h).
// The portable loops below are the C++ twin of tests/reference.py::quantize_4bit_ref; the SIMD paths must
// give the same bytes and absmax, and the tests check every instruction set against the reference.
#include "isa_unit.h"
#include "quantize_4bit.h"

namespace bnbx::cpu {
namespace BNBX_ISA {

#include "simd.h"

// The block scale (BlockScale, block_scale) is common/rules.h's, shared with the CUDA kernels.

static inline uint8_t code_4bit(QuantType quant_type, float scaled) {
  return quant_type == QuantType::kNF4 ? nf4_code(scaled) : fp4_code(scaled);
}

// Codes of in[begin, end) into packed[begin / 2, ...); begin is even. A missing last element (odd end)
// packs as the zero code. Shared by the generic loop and the SIMD paths' tails.
template <FloatType kIn>
static inline void quantize_4bit_range(const void* in, int64_t begin, int64_t end, BlockScale scale,
                                       QuantType quant_type, uint8_t* packed) {
  for (int64_t i = begin; i < end; i += 2) {
    const uint8_t high = code_4bit(quant_type, load_as_float<kIn>(in, i) * scale.prescale * scale.inv_absmax);
    const uint8_t low = i + 1 < end
                            ? code_4bit(quant_type, load_as_float<kIn>(in, i + 1) * scale.prescale * scale.inv_absmax)
                            : zero_code(quant_type);
    packed[i / 2] = static_cast<uint8_t>(high << 4 | low);
  }
}

// NaN/Inf contract: a block holding a NaN or an Inf gets a NaN absmax (so every element of it dequantizes
// to NaN) and zero codes.
static inline void store_nonfinite_block(int64_t block, int64_t start, int64_t end, QuantType quant_type,
                                         uint8_t* packed, float* absmax) {
  absmax[block] = std::numeric_limits<float>::quiet_NaN();
  const uint8_t zero = zero_code(quant_type);
  std::memset(packed + start / 2, zero << 4 | zero, static_cast<size_t>((end - start + 1) / 2));
}

template <FloatType kIn>
static void quantize_4bit_generic(const void* in, int64_t n, int64_t blocksize, QuantType quant_type, uint8_t* packed,
                                  float* absmax, int64_t block_begin, int64_t block_end) {
  for (int64_t block = block_begin; block < block_end; ++block) {
    const int64_t start = block * blocksize;
    const int64_t end = std::min(n, start + blocksize);
    bool nonfinite = false;
    const float block_max = block_absmax<kIn>(in, start, end, &nonfinite);
    if (nonfinite) {
      store_nonfinite_block(block, start, end, quant_type, packed, absmax);
      continue;
    }
    absmax[block] = block_max;
    quantize_4bit_range<kIn>(in, start, end, block_scale(block_max), quant_type, packed);
  }
}

// out[begin, end) = table[code] * block_max, rounded once to kOut; begin is even.
template <FloatType kOut>
static inline void dequantize_4bit_range(const uint8_t* packed, const float table[16], float block_max, int64_t begin,
                                         int64_t end, void* out) {
  for (int64_t i = begin; i < end; ++i) {
    const uint8_t byte = packed[i / 2];
    const uint8_t code = (i & 1) ? (byte & 0x0f) : (byte >> 4);
    store_from_float<kOut>(out, i, table[code] * block_max);
  }
}

template <FloatType kOut>
static void dequantize_4bit_generic(const uint8_t* packed, const float* absmax, int64_t n, int64_t blocksize,
                                    QuantType quant_type, void* out, int64_t block_begin, int64_t block_end) {
  float table[16];
  fill_code_table(quant_type, table);
  for (int64_t block = block_begin; block < block_end; ++block) {
    const int64_t start = block * blocksize;
    const int64_t end = std::min(n, start + blocksize);
    dequantize_4bit_range<kOut>(packed, table, absmax[block], start, end, out);
  }
}

#if defined(__AVX512F__) || defined(__AVX2__)
// ---- SIMD paths ------------------------------------------------------------------------------------------
// They give the generic loops' results bit for bit:
// - absmax: for non-negative floats the integer order of the bit patterns is the float order, and every
//   NaN/Inf pattern is above FLT_MAX's, so one integer max over |x| bits gives both the absmax and the
//   non-finite test (max > FLT_MAX bits).
// - scaling: the same two fp32 products, x * prescale * inv_absmax (no FMA: -ffp-contract=off).
// - codes: "number of thresholds t with x > t". AVX-512 looks it up by cell of width 1/16 (CodeSearch
//   below), AVX2 runs a branch-free binary search over the sorted thresholds, each level picking its pivot
//   from a small table indexed by the code prefix found so far.
// - dequantize: the 16 products table[q] * absmax are computed (and, for 16-bit outputs, rounded) once per
//   block; rounding is a function of the fp32 value, so looking up rounded products equals rounding each one.
// - packing: element 2j in the high nibble of byte j, as quantize_4bit_range does.
// With flush-to-zero or denormals-are-zero set, the generic loops run instead (denormals_flushed, simd.h).
// The input is read once, block by block, and prefetched 8 KiB ahead (prefetch_ahead, simd.h): left to the
// hardware prefetcher, the core waits on memory about a third of the time (measured on a 2-core Xeon with
// AVX-512, 4096x11008 bf16: 8.4 -> 5.9 ms; fp32 gains less).

#if defined(__AVX512F__)
#include "quantize_4bit_avx512.h"
#elif defined(__AVX2__)
#include "quantize_4bit_avx2.h"
#endif

// Outputs at least this large bypass the caches (non-temporal stores): they could not stay there anyway,
// and skipping the read-for-ownership of every output line saves about a third of the memory traffic
// (measured: 4096x11008 bf16, 1.3x faster on one core). Smaller outputs stay cached for their consumer.
constexpr int64_t kStreamOutputBytes = int64_t{16} << 20;

template <FloatType kOut>
static void dequantize_4bit_simd(const uint8_t* packed, const float* absmax, int64_t n, int64_t blocksize,
                                 QuantType quant_type, void* out, int64_t block_begin, int64_t block_end) {
  if (denormals_flushed()) {
    return dequantize_4bit_generic<kOut>(packed, absmax, n, blocksize, quant_type, out, block_begin, block_end);
  }
  const int64_t out_bytes = n * (kOut == FloatType::kFloat32 ? 4 : 2);
  // every block starts 64-byte aligned when the output does (blocksize >= 32 elements of >= 2 bytes)
  if (out_bytes >= kStreamOutputBytes && reinterpret_cast<uintptr_t>(out) % 64 == 0) {
    dequantize_4bit_blocks_simd<kOut, true>(packed, absmax, n, blocksize, quant_type, out, block_begin, block_end);
    _mm_sfence();  // order the weakly-ordered streaming stores before the caller reads the output
  } else {
    dequantize_4bit_blocks_simd<kOut, false>(packed, absmax, n, blocksize, quant_type, out, block_begin, block_end);
  }
}

template <FloatType kIn>
static void quantize_4bit_simd(const void* in, int64_t n, int64_t blocksize, QuantType quant_type, uint8_t* packed,
                               float* absmax, int64_t block_begin, int64_t block_end) {
  if (denormals_flushed()) {
    return quantize_4bit_generic<kIn>(in, n, blocksize, quant_type, packed, absmax, block_begin, block_end);
  }
  if (quant_type == QuantType::kNF4) {
    quantize_4bit_blocks_simd<kIn, QuantType::kNF4>(in, n, blocksize, packed, absmax, block_begin, block_end);
  } else {
    quantize_4bit_blocks_simd<kIn, QuantType::kFP4>(in, n, blocksize, packed, absmax, block_begin, block_end);
  }
}

#define BNBX_4BIT_KERNEL(name) name##_simd
#else
#define BNBX_4BIT_KERNEL(name) name##_generic
#endif

static void quantize_4bit(FloatType in_type, const void* in, int64_t n, int64_t blocksize, QuantType quant_type,
                          uint8_t* packed, float* absmax, int64_t block_begin, int64_t block_end) {
  switch (in_type) {
    case FloatType::kFloat32:
      return BNBX_4BIT_KERNEL(quantize_4bit)<FloatType::kFloat32>(in, n, blocksize, quant_type, packed, absmax,
                                                                  block_begin, block_end);
    case FloatType::kFloat16:
      return BNBX_4BIT_KERNEL(quantize_4bit)<FloatType::kFloat16>(in, n, blocksize, quant_type, packed, absmax,
                                                                  block_begin, block_end);
    case FloatType::kBFloat16:
      return BNBX_4BIT_KERNEL(quantize_4bit)<FloatType::kBFloat16>(in, n, blocksize, quant_type, packed, absmax,
                                                                   block_begin, block_end);
  }
}

static void dequantize_4bit(FloatType out_type, const uint8_t* packed, const float* absmax, int64_t n,
                            int64_t blocksize, QuantType quant_type, void* out, int64_t block_begin,
                            int64_t block_end) {
  switch (out_type) {
    case FloatType::kFloat32:
      return BNBX_4BIT_KERNEL(dequantize_4bit)<FloatType::kFloat32>(packed, absmax, n, blocksize, quant_type, out,
                                                                    block_begin, block_end);
    case FloatType::kFloat16:
      return BNBX_4BIT_KERNEL(dequantize_4bit)<FloatType::kFloat16>(packed, absmax, n, blocksize, quant_type, out,
                                                                    block_begin, block_end);
    case FloatType::kBFloat16:
      return BNBX_4BIT_KERNEL(dequantize_4bit)<FloatType::kBFloat16>(packed, absmax, n, blocksize, quant_type, out,
                                                                     block_begin, block_end);
  }
}

#undef BNBX_4BIT_KERNEL

}  // namespace BNBX_ISA

const Quantize4bitKernels BNBX_TABLE(quantize_4bit) = {BNBX_ISA_NAME, &BNBX_ISA::quantize_4bit,
                                                       &BNBX_ISA::dequantize_4bit};

}  // namespace bnbx::cpu
