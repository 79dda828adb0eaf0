// CPU host code of the LLM.int8() ops: checks, allocation, the GEMM route (AMX-INT8 > AVX512-VNNI > AVX2 /
// scalar, chosen at run time) and at::parallel_for over rows or output columns.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <atomic>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "../common/checks_int8_matmul.h"
#include "cpu_features.h"
#include "fresh_output.h"
#include "kernels/int8_matmul.h"

namespace bnbx {
namespace {

// Forces one GEMM route for tests and benchmarks (bnbx_set_int8_gemm below); kAuto picks the best present.
enum class GemmRoute : int { kAuto = 0, kAmx = 1, kVnni = 2, kBase = 3 };
std::atomic<int> g_forced_route{static_cast<int>(GemmRoute::kAuto)};

const cpu::Int8MatmulKernels& int8_kernels() {
  return cpu::select_kernels(cpu::int8_matmul_scalar, cpu::int8_matmul_avx2, cpu::int8_matmul_avx512);
}

// Below this many rows of A, packing B for AMX costs more than it saves: the VNNI kernel reads B in place.
constexpr int64_t kAmxMinRows = 32;

GemmRoute gemm_route(const cpu::Int8MatmulKernels& kt, int64_t M) {
  const bool amx = kt.gemm_amx != nullptr && cpu::cpu_has_amx();
  const bool vnni = kt.gemm_vnni != nullptr && cpu::cpu_has_avx512_vnni();
  switch (static_cast<GemmRoute>(g_forced_route.load())) {
    case GemmRoute::kAmx:
      return amx ? GemmRoute::kAmx : GemmRoute::kBase;
    case GemmRoute::kVnni:
      return vnni ? GemmRoute::kVnni : GemmRoute::kBase;
    case GemmRoute::kBase:
      return GemmRoute::kBase;
    default:
      return amx && (M >= kAmxMinRows || !vnni) ? GemmRoute::kAmx : vnni ? GemmRoute::kVnni : GemmRoute::kBase;
  }
}

const char* route_name(GemmRoute route, const cpu::Int8MatmulKernels& kt) {
  switch (route) {
    case GemmRoute::kAmx:
      return "amx";
    case GemmRoute::kVnni:
      return "avx512_vnni";
    default:
      return kt.name;
  }
}

// B packed for the AMX kernel (amx_pack), in a uint8 tensor.
at::Tensor amx_pack_tensor(const cpu::Int8MatmulKernels& kt, const int8_t* B, int64_t N, int64_t K,
                           const at::TensorOptions& options) {
  at::Tensor packed = at::empty({kt.amx_packed_bytes(N, K)}, options.dtype(at::kByte));
  uint8_t* dst = packed.mutable_data_ptr<uint8_t>();
  at::parallel_for(0, ceil_div(N, 16), 4, [&](int64_t b, int64_t e) { kt.amx_pack(B, N, K, dst, b, e); });
  return packed;
}

// The AMX product of A (rows with stride lda, a_bytes readable) and B: int32 into C, or (ep) through the
// epilogue into ep->out. Output columns in panels of 32 (two 16-row blocks of B), split between the threads.
// Without packed_B the kernel packs each panel of B as it reaches it, once per pass of 256 rows of A: in
// cache, that measured faster than packing all of B first into a fresh N x K buffer (whose page faults
// alone cost ~18 ms at 4096 x 11008 here), up to M = 2048.
void amx_gemm(const cpu::Int8MatmulKernels& kt, const int8_t* A, int64_t lda, int64_t a_bytes, const int8_t* B,
              const uint8_t* packed_B, int32_t* C, int64_t M, int64_t N, int64_t K, const cpu::Int8Epilogue* ep) {
  at::parallel_for(0, ceil_div(N, 32), 1, [&](int64_t b, int64_t e) {
    kt.gemm_amx(A, lda, a_bytes, B, packed_B, C, M, N, K, b * 32, std::min(N, e * 32), ep);
  });
}

// About 256K elements per task: these passes cost ~1 ns per element, so smaller tasks only add wake-ups.
int64_t grain_rows(int64_t K) { return std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(K, 1)); }

// C[M, N] = A[M, K] . B[N, K]^T, exact int32; A, B contiguous. visit_rows (optional) is called once for every
// row range of B, right after the VNNI / plain kernels streamed those rows (they are still in cache then).
void int8_gemm(const int8_t* A, const int8_t* B, int32_t* C, int64_t M, int64_t N, int64_t K,
               const std::function<void(int64_t, int64_t)>& visit_rows = nullptr) {
  if (M == 0 || N == 0) return;
  const cpu::Int8MatmulKernels& kt = int8_kernels();
  const GemmRoute route = K == 0 ? GemmRoute::kBase : gemm_route(kt, M);
  if (K == 0 || route == GemmRoute::kAmx) {
    if (visit_rows) at::parallel_for(0, N, 1024, visit_rows);
    if (K == 0) {
      std::memset(C, 0, sizeof(int32_t) * M * N);
      return;
    }
  }
  if (route == GemmRoute::kAmx) {
    if (K % 256 != 0) return amx_gemm(kt, A, K, M * K, B, nullptr, C, M, N, K, nullptr);
    // rows a multiple of 256 bytes apart put the 16 rows of an A tile into the same cache sets (4 KiB
    // aliasing): tile loads then run ~25% slower than from rows one line further apart, so copy A that way
    const int64_t lda = K + 64;
    at::Tensor copy = at::empty({M * lda}, at::TensorOptions().dtype(at::kChar));
    int8_t* a = copy.mutable_data_ptr<int8_t>();
    at::parallel_for(0, M, grain_rows(K), [&](int64_t b, int64_t e) {
      for (int64_t m = b; m < e; ++m) std::memcpy(a + m * lda, A + m * K, K);
    });
    return amx_gemm(kt, a, lda, M * lda, B, nullptr, C, M, N, K, nullptr);
  }
  const auto fn = route == GemmRoute::kVnni ? kt.gemm_vnni : kt.gemm;
  const int64_t panels = ceil_div(N, 4);
  constexpr int64_t kVisitPanels = 16;  // 64 rows of B per visit
  at::parallel_for(0, panels, std::max<int64_t>(1, 8192 / (K * std::max<int64_t>(M, 1))), [&](int64_t b, int64_t e) {
    if (!visit_rows) return fn(A, B, C, M, N, K, b * 4, std::min(N, e * 4));
    for (int64_t p = b; p < e; p += kVisitPanels) {
      const int64_t n0 = p * 4, n1 = std::min(N, std::min(e, p + kVisitPanels) * 4);
      fn(A, B, C, M, N, K, n0, n1);
      visit_rows(n0, n1);
    }
  });
}

// Product of all but the last dimension (1 for a 1-D tensor): the rows of the matrix view, also when K = 0.
int64_t leading_rows(const at::Tensor& t) { return c10::multiply_integers(t.sizes().slice(0, t.dim() - 1)); }

// Row-wise quantization of the contiguous A[rows, K]; fills q, stats and (threshold > 0) the outlier columns.
// Rows of q start ldq bytes apart.
std::vector<int64_t> vectorwise_quant_into(const at::Tensor& input, int64_t rows, int64_t K, float threshold, int8_t* q,
                                           int64_t ldq, float* stats) {
  const cpu::Int8MatmulKernels& kt = int8_kernels();
  const FloatType in_type = to_float_type(input.scalar_type());
  const void* in = input.const_data_ptr();
  std::vector<int64_t> cols;
  std::vector<uint8_t> mask;
  if (threshold > 0.0f && rows > 0) {
    // one mask per task, ORed afterwards, so no two threads write the same byte
    const int64_t tasks = std::min<int64_t>(ceil_div(rows, grain_rows(K)), std::max(1, at::get_num_threads()));
    std::vector<uint8_t> masks(tasks * K, 0);
    at::parallel_for(0, tasks, 1, [&](int64_t tb, int64_t te) {
      for (int64_t t = tb; t < te; ++t) {
        kt.outlier_columns(in_type, in, K, threshold, masks.data() + t * K, rows * t / tasks, rows * (t + 1) / tasks);
      }
    });
    mask.assign(K, 0);
    for (int64_t t = 0; t < tasks; ++t) {
      for (int64_t k = 0; k < K; ++k) mask[k] |= masks[t * K + k];
    }
    for (int64_t k = 0; k < K; ++k) {
      if (mask[k]) cols.push_back(k);
    }
  }
  const uint8_t* mask_ptr = cols.empty() ? nullptr : mask.data();
  at::parallel_for(0, rows, grain_rows(K), [&](int64_t b, int64_t e) {
    kt.vectorwise_quant(in_type, in, K, threshold, mask_ptr, q, ldq, stats, b, e);
  });
  return cols;
}

at::Tensor cols_tensor(const std::vector<int64_t>& cols, const at::Tensor& like) {
  at::Tensor out = at::empty({static_cast<int64_t>(cols.size())}, like.options().dtype(at::kLong));
  if (!cols.empty()) std::memcpy(out.mutable_data_ptr<int64_t>(), cols.data(), cols.size() * sizeof(int64_t));
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> int8_vectorwise_quant_cpu(const at::Tensor& A, double threshold) {
  check_int8_vectorwise_quant_args(A, threshold);
  const at::Tensor input = A.contiguous();
  const int64_t K = input.size(-1);
  const int64_t rows = leading_rows(input);
  at::Tensor q = cpu::empty_output(input.sizes(), input.options().dtype(at::kChar));
  at::Tensor stats = at::empty({rows}, input.options().dtype(at::kFloat));
  if (K == 0) {
    stats.zero_();
    return {q, stats, cols_tensor({}, input)};
  }
  const std::vector<int64_t> cols =
      vectorwise_quant_into(input, rows, K, threshold_in_dtype(threshold, input.scalar_type()),
                            q.mutable_data_ptr<int8_t>(), K, stats.mutable_data_ptr<float>());
  return {q, stats, cols_tensor(cols, input)};
}

at::Tensor int8_vectorwise_dequant_cpu(const at::Tensor& A, const at::Tensor& stats) {
  check_int8_vectorwise_dequant_args(A, stats);
  const at::Tensor q = A.contiguous();
  const at::Tensor s = stats.contiguous();
  const int64_t K = q.size(-1);
  const int64_t rows = leading_rows(q);
  at::Tensor out = cpu::empty_output(q.sizes(), q.options().dtype(at::kFloat));
  const cpu::Int8MatmulKernels& kt = int8_kernels();
  at::parallel_for(0, rows, grain_rows(K), [&](int64_t b, int64_t e) {
    kt.vectorwise_dequant(q.const_data_ptr<int8_t>(), s.const_data_ptr<float>(), K, out.mutable_data_ptr<float>(), b,
                          e);
  });
  return out;
}

std::vector<int64_t> out_shape(const at::Tensor& A, int64_t N) {
  std::vector<int64_t> shape(A.sizes().begin(), A.sizes().end());
  shape.back() = N;
  return shape;
}

at::Tensor int8_linear_matmul_cpu(const at::Tensor& A, const at::Tensor& B) {
  check_int8_linear_matmul_args(A, B);
  const at::Tensor a = A.contiguous();
  const at::Tensor b = B.contiguous();
  const int64_t K = a.size(-1), N = b.size(0);
  const int64_t rows = leading_rows(a);
  at::Tensor C = at::empty(out_shape(a, N), a.options().dtype(at::kInt));
  int8_gemm(a.const_data_ptr<int8_t>(), b.const_data_ptr<int8_t>(), C.mutable_data_ptr<int32_t>(), rows, N, K);
  return C;
}

void mm_dequant_into(const int32_t* C, const float* row_stats, const float* col_stats,
                     const c10::optional<at::Tensor>& bias, const float* a_out, const float* b_out, int64_t n_out,
                     at::ScalarType dtype, void* out, int64_t rows, int64_t N) {
  const cpu::Int8MatmulKernels& kt = int8_kernels();
  at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
  const void* bias_ptr = bias_c.defined() ? bias_c.const_data_ptr() : nullptr;
  const FloatType bias_type = bias_c.defined() ? to_float_type(bias_c.scalar_type()) : FloatType::kFloat32;
  at::parallel_for(0, rows, grain_rows(N), [&](int64_t b, int64_t e) {
    kt.mm_dequant(C, row_stats, col_stats, bias_type, bias_ptr, a_out, b_out, n_out, to_float_type(dtype), out, N, b,
                  e);
  });
}

at::Tensor int8_mm_dequant_cpu(const at::Tensor& A, const at::Tensor& row_stats, const at::Tensor& col_stats,
                               c10::optional<at::ScalarType> dtype, const c10::optional<at::Tensor>& bias) {
  const at::ScalarType out_dtype = dtype.value_or(at::kHalf);  // bitsandbytes' default
  check_int8_mm_dequant_args(A, row_stats, col_stats, out_dtype, bias);
  const at::Tensor C = A.contiguous();
  const at::Tensor rs = row_stats.contiguous();
  const at::Tensor cs = col_stats.contiguous();
  const int64_t N = C.size(-1);
  const int64_t rows = leading_rows(C);
  at::Tensor out = cpu::empty_output(C.sizes(), C.options().dtype(out_dtype));
  mm_dequant_into(C.const_data_ptr<int32_t>(), rs.const_data_ptr<float>(), cs.const_data_ptr<float>(), bias, nullptr,
                  nullptr, 0, out_dtype, out.mutable_data_ptr(), rows, N);
  return out;
}

// Outlier columns fused into the epilogue up to this many; beyond it one fp32 GEMM adds them instead.
constexpr int64_t kFusedOutliers = 32;

// The layer (int8_mixed_linear, and int8_mixed_linear_packed with the AMX-packed weight packed_CB).
// On the AMX route the activations are quantized into rows padded to whole tiles, and the epilogue runs on each
// accumulator tile as the GEMM stores it: the int32 product is never written. Other routes write it and run
// int8_mm_dequant's kernel after; both give the same bits.
at::Tensor int8_mixed_linear_impl(const at::Tensor& A, const at::Tensor& CB, const uint8_t* packed_CB,
                                  const at::Tensor& SCB, const c10::optional<at::Tensor>& bias, double threshold) {
  const at::Tensor input = A.contiguous();
  const at::Tensor weight = CB.contiguous();
  const at::Tensor scb = SCB.contiguous();
  const int64_t K = input.size(-1), N = weight.size(0);
  const int64_t rows = leading_rows(input);
  at::Tensor out = at::empty(out_shape(input, N), input.options());
  if (rows == 0 || N == 0) return out;

  const cpu::Int8MatmulKernels& kt = int8_kernels();
  const bool fused = K > 0 && gemm_route(kt, rows) == GemmRoute::kAmx;
  // fused: row stride a whole number of 64-byte tile rows plus one line (so the 16 rows of a tile do not share
  // cache sets), rows up to a multiple of 32, so every tile load stays inside q
  const int64_t ldq = fused ? ceil_div(K, 64) * 64 + 64 : K;
  const int64_t q_rows = fused ? ceil_div(rows, 32) * 32 : rows;
  at::Tensor q = at::empty({q_rows * ldq}, input.options().dtype(at::kChar));
  at::Tensor stats = at::empty({rows}, input.options().dtype(at::kFloat));
  int8_t* qp = q.mutable_data_ptr<int8_t>();
  if (q_rows > rows) std::memset(qp + rows * ldq, 0, (q_rows - rows) * ldq);
  const std::vector<int64_t> cols =
      K == 0 ? std::vector<int64_t>{}
             : vectorwise_quant_into(input, rows, K, threshold_in_dtype(threshold, input.scalar_type()), qp, ldq,
                                     stats.mutable_data_ptr<float>());
  if (K == 0) stats.zero_();

  // outlier part: A[:, cols] (input values) times the dequantized weight columns CB[:, cols] * SCB / 127
  const int64_t n_out = static_cast<int64_t>(cols.size());
  at::Tensor a_out, b_out;
  if (n_out > 0) {
    const at::Tensor idx = cols_tensor(cols, input);
    a_out = input.reshape({rows, K}).index_select(1, idx).to(at::kFloat).contiguous();
    b_out = at::empty({n_out, N}, input.options().dtype(at::kFloat));
  }
  // b_out[j, n] = float(CB[n, cols[j]]) * SCB[n] * (1/127): a direct gather (index_select over the columns of an
  // int8 matrix is a slow generic loop), the same two fp32 roundings. Rows of CB are 4 KiB or more apart, so
  // the gather is a cache and TLB miss per row unless the GEMM just streamed them: the VNNI / plain routes
  // run it on each row range as they go, the AMX kernel as it packs each panel (a pre-packed weight: before).
  const int8_t* w = weight.const_data_ptr<int8_t>();
  const float* scb_ptr = scb.const_data_ptr<float>();
  float* bo = n_out > 0 ? b_out.mutable_data_ptr<float>() : nullptr;
  std::function<void(int64_t, int64_t)> gather;
  if (n_out > 0) {
    gather = [&](int64_t nb, int64_t ne) {
      for (int64_t n = nb; n < ne; ++n) {
        for (int64_t j = 0; j < n_out; ++j) {
          bo[j * N + n] = static_cast<float>(w[n * K + cols[j]]) * scb_ptr[n] * 7.874015718698502e-3f;
        }
      }
    };
  }
  const bool addmm = n_out > kFusedOutliers;
  at::Tensor result = addmm ? at::empty({rows, N}, input.options().dtype(at::kFloat)) : out;
  const at::ScalarType result_type = addmm ? at::kFloat : input.scalar_type();
  const float* a_ptr = n_out > 0 && !addmm ? a_out.const_data_ptr<float>() : nullptr;
  const float* b_ptr = n_out > 0 && !addmm ? b_out.const_data_ptr<float>() : nullptr;

  if (fused) {
    // packing the weight itself, the kernel gathers as it goes; a pre-packed weight needs the pass here
    const bool kernel_gathers = gather && packed_CB == nullptr && !addmm;
    if (gather && !kernel_gathers) at::parallel_for(0, N, 1024, gather);
    at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
    const cpu::Int8Epilogue ep{stats.const_data_ptr<float>(),
                               scb.const_data_ptr<float>(),
                               bias_c.defined() ? to_float_type(bias_c.scalar_type()) : FloatType::kFloat32,
                               bias_c.defined() ? bias_c.const_data_ptr() : nullptr,
                               a_ptr,
                               b_ptr,
                               addmm ? 0 : n_out,
                               to_float_type(result_type),
                               result.mutable_data_ptr(),
                               kernel_gathers ? cols.data() : nullptr,
                               kernel_gathers ? bo : nullptr};
    amx_gemm(kt, qp, ldq, q_rows * ldq, weight.const_data_ptr<int8_t>(), packed_CB, nullptr, rows, N, K, &ep);
  } else {
    at::Tensor C = at::empty({rows, N}, input.options().dtype(at::kInt));
    int8_gemm(qp, weight.const_data_ptr<int8_t>(), C.mutable_data_ptr<int32_t>(), rows, N, K, gather);
    mm_dequant_into(C.const_data_ptr<int32_t>(), stats.const_data_ptr<float>(), scb.const_data_ptr<float>(), bias,
                    a_ptr, b_ptr, addmm ? 0 : n_out, result_type, result.mutable_data_ptr(), rows, N);
  }
  if (addmm) {
    result.addmm_(a_out, b_out);
    out.copy_(result.view(out.sizes()));
  }
  return out;
}

at::Tensor int8_mixed_linear_cpu(const at::Tensor& A, const at::Tensor& CB, const at::Tensor& SCB,
                                 const c10::optional<at::Tensor>& bias, double threshold) {
  check_int8_mixed_linear_args(A, CB, SCB, bias, threshold);
  return int8_mixed_linear_impl(A, CB, nullptr, SCB, bias, threshold);
}

// The weight in the AMX tile layout (int8_mixed_linear_packed's packed_CB): uint8 [amx_packed_bytes(N, K)].
at::Tensor int8_pack_weight_cpu(const at::Tensor& CB) {
  check_int8_pack_weight_args(CB);
  const cpu::Int8MatmulKernels& kt = int8_kernels();
  TORCH_CHECK(kt.amx_pack != nullptr, "int8_pack_weight: needs a CPU with AVX-512 (the AMX layout); this one runs ",
              kt.name);
  const at::Tensor weight = CB.contiguous();
  return amx_pack_tensor(kt, weight.const_data_ptr<int8_t>(), weight.size(0), weight.size(1), weight.options());
}

at::Tensor int8_mixed_linear_packed_cpu(const at::Tensor& A, const at::Tensor& CB, const at::Tensor& packed_CB,
                                        const at::Tensor& SCB, const c10::optional<at::Tensor>& bias,
                                        double threshold) {
  check_int8_mixed_linear_args(A, CB, SCB, bias, threshold, "int8_mixed_linear_packed");
  const cpu::Int8MatmulKernels& kt = int8_kernels();
  const int64_t expected = kt.amx_packed_bytes != nullptr ? kt.amx_packed_bytes(CB.size(0), CB.size(1)) : -1;
  check_int8_packed_weight("int8_mixed_linear_packed", packed_CB, expected, A);
  // the packed copy only serves the AMX route; the others read CB
  const bool use_packed = expected >= 0 && gemm_route(kt, leading_rows(A)) == GemmRoute::kAmx;
  const at::Tensor packed = packed_CB.contiguous();
  return int8_mixed_linear_impl(A, CB, use_packed ? packed.const_data_ptr<uint8_t>() : nullptr, SCB, bias, threshold);
}

}  // namespace

TORCH_LIBRARY_IMPL(bnbx, CPU, m) {
  m.impl("int8_vectorwise_quant", &int8_vectorwise_quant_cpu);
  m.impl("int8_vectorwise_dequant", &int8_vectorwise_dequant_cpu);
  m.impl("int8_linear_matmul", &int8_linear_matmul_cpu);
  m.impl("int8_mm_dequant", &int8_mm_dequant_cpu);
  m.impl("int8_mixed_linear", &int8_mixed_linear_cpu);
  m.impl("int8_pack_weight", &int8_pack_weight_cpu);
  m.impl("int8_mixed_linear_packed", &int8_mixed_linear_packed_cpu);
}

}  // namespace bnbx

// ctypes interface (tests, benchmarks): which int8 GEMM route runs, and forcing one.
extern "C" {

const char* bnbx_int8_gemm_route() {
  const auto& kt = bnbx::int8_kernels();
  return bnbx::route_name(bnbx::gemm_route(kt, 2048), kt);
}

// "auto", "amx", "avx512_vnni" or "base" (the active instruction set's plain kernel); 0 for an unknown name.
int bnbx_set_int8_gemm(const char* name) {
  const std::string s(name);
  int route = s == "auto" ? 0 : s == "amx" ? 1 : s == "avx512_vnni" ? 2 : s == "base" ? 3 : -1;
  if (route < 0) return 0;
  bnbx::g_forced_route.store(route);
  return 1;
}
}
