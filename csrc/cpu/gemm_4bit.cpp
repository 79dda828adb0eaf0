// CPU host code of gemm_4bit: out = A @ W^T (+ bias) with W the packed 4-bit weight, never dequantized whole.
// - few rows (gemv_max_rows): the fused GEMV (kernels/gemm_4bit_impl.h), fp32 accumulation, threads over rows of W.
// - bf16 A on CPUs with AMX, the M that amx_rows takes: blocks of 32 rows of W dequantized to bf16 in L1 / L2 and
//   multiplied on the AMX tiles (kernels/gemm_4bit_amx.h), threads over blocks.
// - otherwise: tiles of W's rows dequantized into a scratch buffer in A's dtype, each multiplied by at::mm
//   (oneDNN). Double-quantized absmax is decoded per block of rows into a small fp32 buffer.
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cstdlib>
#include <memory>
#include <numeric>

#include "../common/checks_gemm_4bit.h"
#include "cpu_features.h"
#include "fresh_output.h"
#include "kernels/gemm_4bit.h"
#include "kernels/quantize_4bit.h"

namespace bnbx {
namespace {

// Crossover between the fused GEMV and the 16-bit GEMMs, measured with benchmarks/bench_linear4bit.py
// (K=4096, N=11008, 2 threads): the AMX kernel (bf16 inputs) costs about the same from M = 1 to 16 and beats the
// GEMV from M = 3. Without it (other dtypes or CPUs), the GEMV's register-blocked loop (kBlockA rows of A) beats
// the dequantized tiles into at::mm up to M = 64, 2026-11-30 on the 2-core Xeon with oneDNN held to the ISAs of
// CPUs without AMX (ONEDNN_MAX_CPU_ISA; ms GEMV / tiles, bf16): AVX512_CORE_BF16 M=16 13.0 / 16.2, M=64
// 41.1 / 40.7; AVX512_CORE M=16 12.8 / 39.6, M=64 43.7 / 119.3; fp32 inputs M=64 37.2 / 45.2, M=128 70.8 / 76.6
// (the README's table).
constexpr int64_t kGemvMaxRows = 64;
constexpr int64_t kGemvMaxRowsBeforeAmx = 2;
// Rows of W per tile of the GEMM path: large enough that at::mm's per-call cost and blocking do not matter.
constexpr int64_t kTileRows = 1024;

int64_t gemv_max_rows(bool amx) {
  // Tuning hook for the benchmark (the crossover moves with the CPU); not part of the API.
  if (const char* value = std::getenv("BNBX_GEMM_4BIT_GEMV_MAX_M")) return std::atoll(value);
  return amx ? kGemvMaxRowsBeforeAmx : kGemvMaxRows;
}

int64_t tile_rows() {
  if (const char* value = std::getenv("BNBX_GEMM_4BIT_TILE_ROWS")) return std::max<int64_t>(1, std::atoll(value));
  return kTileRows;
}

// Which M the AMX kernel (bf16 inputs) takes; the others go to tiles into at::mm, whose blocking over M is better.
// The AMX kernel streams all of x past every 32 rows of W, so it wins while x stays in L2 (2 MiB a core here).
// Measured on the 2-core Xeon (NF4 + double quant, bf16; ms AMX / tiles), 2026-11-30 after the tile-layout
// scratch, bf16 stores and packing x on all threads: 4096x11008 M=128 9.9 / 11.3, M=256 (x 2 MiB) 22.9 / 27.7,
// M=512 35.4 / 35.0; M=512 with 1024x1024 0.90 / 1.08, 1024x2816 2.27 / 2.40, 2816x1024 (x 2.8 MiB) 2.67 / 2.48.
constexpr int64_t kAmxMaxRows = 128;
constexpr int64_t kAmxMaxXElements = int64_t{1} << 20;  // x padded to Mp x Kp, bf16: 2 MiB

bool amx_rows(int64_t M, int64_t K) {
  // Tuning hook for the benchmark and the tests; not part of the API.
  if (const char* value = std::getenv("BNBX_GEMM_4BIT_AMX_MAX_M")) return M <= std::atoll(value);
  return M <= kAmxMaxRows || ceil_div(M, 16) * 16 * ceil_div(K, 32) * 32 <= kAmxMaxXElements;
}

const cpu::Gemm4bitKernels& gemm_kernels() {
  return cpu::select_kernels(cpu::gemm_4bit_scalar, cpu::gemm_4bit_avx2, cpu::gemm_4bit_avx512);
}

at::Tensor gemm_4bit_cpu(const at::Tensor& A, const at::Tensor& B, const at::Tensor& absmax, int64_t blocksize,
                         c10::string_view quant_type, at::IntArrayRef shape, const std::optional<at::Tensor>& bias,
                         const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& nested_code,
                         const std::optional<at::Tensor>& nested_offset, int64_t nested_blocksize) {
  const Gemm4bitArgs args = check_gemm_4bit_args(A, B, absmax, blocksize, quant_type, shape, bias, nested_absmax,
                                                 nested_code, nested_offset, nested_blocksize);
  const int64_t N = args.N, K = args.K;
  const std::vector<int64_t> out_shape = gemm_4bit_out_shape(A, N);
  const int64_t M = c10::multiply_integers(A.sizes().begin(), A.sizes().end() - 1);
  if (M == 0 || N == 0) return at::empty(out_shape, A.options());
  if (K == 0) {
    at::Tensor out = at::zeros({M, N}, A.options());
    if (bias.has_value()) out.add_(*bias);
    return out.view(out_shape);
  }
  const at::Tensor a2 = A.reshape({M, K}).contiguous();

  const at::Tensor packed = B.contiguous();
  const uint8_t* packed_ptr = static_cast<const uint8_t*>(packed.const_data_ptr());
  const at::Tensor stats = absmax.contiguous();
  at::Tensor nested_stats, nested_table;
  cpu::Absmax4bit scales;
  if (args.nested) {
    nested_stats = nested_absmax->contiguous();
    nested_table = nested_code->contiguous();
    scales.absmax_q = stats.const_data_ptr<uint8_t>();
    scales.nested_absmax = nested_stats.const_data_ptr<float>();
    scales.nested_code = nested_table.const_data_ptr<float>();
    scales.offset = nested_offset->item<float>();
    scales.nested_blocksize = nested_blocksize;
  } else {
    scales.absmax = stats.const_data_ptr<float>();
  }
  const cpu::Gemm4bitKernels& kernels = gemm_kernels();

  const bool amx = A.scalar_type() == at::kBFloat16 && kernels.gemm_amx != nullptr && amx_rows(M, K) &&
                   cpu::cpu_has_amx() && cpu::cpu_has_avx512_bf16();
  if (M <= gemv_max_rows(amx)) {
    at::Tensor a32 = at::empty({M, K}, A.options().dtype(at::kFloat));
    kernels.pack_a(to_float_type(A.scalar_type()), a2.const_data_ptr(), M, K, a32.mutable_data_ptr<float>());
    at::Tensor out32 = at::empty({M, N}, A.options().dtype(at::kFloat));
    const float* a_ptr = a32.const_data_ptr<float>();
    float* out_ptr = out32.mutable_data_ptr<float>();
    at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
      kernels.gemv(a_ptr, M, K, packed_ptr, scales, blocksize, args.type, out_ptr, N, begin, end);
    });
    if (bias.has_value()) out32.add_(bias->to(at::kFloat));
    return out32.to(A.scalar_type()).view(out_shape);
  }

  if (amx) {
    const int64_t Mp = ceil_div(M, 16) * 16, Kp = ceil_div(K, 32) * 32;
    at::Tensor x = at::empty({Mp * Kp}, A.options());
    uint16_t* x_ptr = reinterpret_cast<uint16_t*>(x.mutable_data_ptr<at::BFloat16>());
    const uint16_t* a_ptr = reinterpret_cast<const uint16_t*>(a2.const_data_ptr<at::BFloat16>());
    at::parallel_for(0, Mp / 16, 1, [&](int64_t begin, int64_t end) {
      kernels.pack_x_amx(a_ptr, M, K, Mp, Kp, blocksize, x_ptr, begin, end);
    });
    // bf16 straight from the accumulators, the bias added in fp32 before the one rounding
    at::Tensor out = cpu::empty_output({M, N}, A.options());
    uint16_t* out_ptr = reinterpret_cast<uint16_t*>(out.mutable_data_ptr<at::BFloat16>());
    const at::Tensor bias32 = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
    const float* bias_ptr = bias32.defined() ? bias32.const_data_ptr<float>() : nullptr;
    at::parallel_for(0, ceil_div(N, 32), 1, [&](int64_t begin, int64_t end) {
      // scratch, each part fully written before it is read
      std::unique_ptr<uint16_t[]> wbuf(new uint16_t[static_cast<size_t>(32 * Kp)]);
      std::unique_ptr<float[]> acc(new float[static_cast<size_t>(Mp * 32)]);
      std::vector<float> row_scales(static_cast<size_t>(32 * (K / blocksize + 2)));
      kernels.gemm_amx(x_ptr, M, Mp, K, Kp, packed_ptr, scales, blocksize, args.type, out_ptr, bias_ptr, N, begin, end,
                       wbuf.get(), row_scales.data(), acc.get());
    });
    return out.view(out_shape);
  }

  // Tiles start on a block boundary so that each one is a self-contained run of blocks: a multiple of
  // blocksize / gcd(K, blocksize) rows (blocks may span rows when K is not a multiple of blocksize).
  const int64_t row_step = blocksize / std::gcd(K, blocksize);
  const int64_t rows_per_tile = ceil_div(std::max(tile_rows(), row_step), row_step) * row_step;
  const int64_t tiles = ceil_div(N, rows_per_tile);
  const cpu::Quantize4bitKernels& base =
      cpu::select_kernels(cpu::quantize_4bit_scalar, cpu::quantize_4bit_avx2, cpu::quantize_4bit_avx512);
  const FloatType tile_type = to_float_type(A.scalar_type());
  at::Tensor out = cpu::empty_output({M, N}, A.options());  // every tile's mm_out writes its columns
  // One tile at a time: its dequantization split over the threads, then at::mm, which is multithreaded itself
  // (oneDNN blocks a large product better than independent per-thread products would).
  at::Tensor tile = at::empty({rows_per_tile, K}, A.options());
  std::vector<float> tile_scales(static_cast<size_t>(ceil_div(rows_per_tile * K, blocksize)));
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t n0 = t * rows_per_tile;
    const int64_t rows = std::min(rows_per_tile, N - n0);
    const int64_t elements = rows * K;
    const int64_t first_block = n0 * K / blocksize;
    const int64_t blocks = ceil_div(elements, blocksize);
    const uint8_t* tile_packed = packed_ptr + n0 * K / 2;
    at::parallel_for(0, blocks, grain_in_blocks(blocksize), [&](int64_t begin, int64_t end) {
      kernels.decode_absmax(scales, first_block + begin, first_block + end, tile_scales.data() + begin);
      base.dequantize(tile_type, tile_packed, tile_scales.data(), elements, blocksize, args.type,
                      tile.mutable_data_ptr(), begin, end);
    });
    at::Tensor dst = out.narrow(1, n0, rows);
    if (bias.has_value())  // the bias joins the fp32 sums before the one rounding, as in F.linear (addmm)
      at::addmm_out(dst, bias->narrow(0, n0, rows), a2, tile.narrow(0, 0, rows).t());
    else
      at::mm_out(dst, a2, tile.narrow(0, 0, rows).t());
  }
  return out.view(out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(bnbx, CPU, m) { m.impl("gemm_4bit", &gemm_4bit_cpu); }

}  // namespace bnbx
