// CUDA LLM.int8() ops: vector-wise quantization with outlier columns, the int8 GEMM (dp4a), the dequantizing
// epilogue and the fused mixed-precision layer. Same rules and operation order as the CPU kernels
// (csrc/cpu/kernels/int8_matmul_impl.h), every product and sum rounded once (__fmul_rn/__fadd_rn, and
// CMakeLists.txt compiles with -fmad=false).
//
// The GEMM is a tiled __dp4a kernel (64 x 64 output tile per block, 4 x 4 per thread, K in 64-byte steps
// through shared memory): exact int32 sums on every GPU from sm_61, with no cuBLASLt dependency (the CI
// toolkit ships no cuBLASLt headers). A tensor-core (mma.sync s8) kernel is the next step for speed.
//
// The kernels and their torch-free launchers come first; csrc/cuda/emulation/emu_int8_matmul.cpp runs them on
// the CPU in the tests. The torch host code follows (not emulated; tests/cuda_emulation.py repeats its steps).
#include "cuda_utils.cuh"

namespace bnbx::cuda {
namespace {

constexpr float kInv127 = 7.874015718698502e-3f;
constexpr float kInv127Sq = 6.200124e-05f;
constexpr int kRowThreads = 256;
constexpr int kElementThreads = 256;
// columns of outliers fused into the epilogue; beyond it one fp32 GEMM adds them (as on the CPU)
constexpr int64_t kFusedOutliers = 32;

template <typename T>
__global__ void outlier_columns_kernel(const T* __restrict__ A, int64_t n, int64_t K, float threshold,
                                       uint8_t* __restrict__ mask) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    if (fabsf(to_float(A[i])) >= threshold) mask[i % K] = 1;  // every writer stores the same byte
  }
}

// One block per row: the statistic (max |x| over |x| < threshold, NaN if any NaN), then q.
template <typename T>
__global__ void __launch_bounds__(kRowThreads)
    vectorwise_quant_kernel(const T* __restrict__ A, int64_t K, float threshold, const uint8_t* __restrict__ mask,
                            int8_t* __restrict__ q, float* __restrict__ stats) {
  const int64_t row = blockIdx.x;
  const T* a = A + row * K;
  float amax = 0.0f;
  int nan = 0;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    const float ax = fabsf(to_float(a[k]));
    if (ax != ax) {
      nan = 1;
    } else if (threshold == 0.0f || ax < threshold) {
      amax = fmaxf(amax, ax);
    }
  }
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, offset));
  __shared__ float warp_max[kRowThreads / kWarpSize];
  if (threadIdx.x % kWarpSize == 0) warp_max[threadIdx.x / kWarpSize] = amax;
  const int any_nan = __syncthreads_or(nan);
  float stat = 0.0f;
  for (int w = 0; w < kRowThreads / kWarpSize; ++w) stat = fmaxf(stat, warp_max[w]);
  if (any_nan) stat = __int_as_float(0x7fc00000);  // std::numeric_limits<float>::quiet_NaN(), as the CPU
  if (threadIdx.x == 0) stats[row] = stat;
  const float scale = __fmul_rn(__fdiv_rn(1.0f, stat), 127.0f);  // torch's 127 / stat
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    const float v = __fmul_rn(to_float(a[k]), scale);
    // NaN, and +-Inf when 1 / stat overflows (a row whose absmax is below 2^-128), give 0 as on the CPU; the
    // saturating conversion alone would make +Inf -1 and -Inf 0
    const bool zero = (mask != nullptr && mask[k] != 0) || !(fabsf(v) <= FLT_MAX);
    q[row * K + k] = zero ? int8_t(0) : static_cast<int8_t>(__float2int_rn(v));
  }
}

__global__ void vectorwise_dequant_kernel(const int8_t* __restrict__ q, const float* __restrict__ stats, int64_t n,
                                          int64_t K, float* __restrict__ out) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    out[i] = __fmul_rn(__fmul_rn(static_cast<float>(q[i]), stats[i / K]), kInv127);
  }
}

// ---- GEMM: C[M, N] = A[M, K] . B[N, K]^T ----------------------------------------------------------------------
constexpr int kTile = 64;       // output rows and columns per block
constexpr int kStepBytes = 64;  // K bytes per shared-memory step
constexpr int kStepWords = kStepBytes / 4;

// 4 bytes of row `row` of X[rows, K] from column k as one int (little-endian), zeros past the edges.
__device__ __forceinline__ int load_word(const int8_t* __restrict__ X, int64_t rows, int64_t K, int64_t row,
                                         int64_t k) {
  if (row >= rows) return 0;
  const int8_t* p = X + row * K;
  uint32_t word = 0;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    if (k + j < K) word |= static_cast<uint32_t>(static_cast<uint8_t>(p[k + j])) << (8 * j);
  }
  return static_cast<int>(word);
}

__global__ void __launch_bounds__(256) gemm_dp4a_kernel(const int8_t* __restrict__ A, const int8_t* __restrict__ B,
                                                        int32_t* __restrict__ C, int64_t M, int64_t N, int64_t K) {
  __shared__ int As[kTile][kStepWords + 1];  // +1: rows start in different banks
  __shared__ int Bs[kTile][kStepWords + 1];
  const int64_t m0 = int64_t(blockIdx.x) * kTile;
  const int64_t n0 = int64_t(blockIdx.y) * kTile;
  const int tid = threadIdx.x;
  const int ty = tid / 16, tx = tid % 16;
  int acc[4][4] = {};
  for (int64_t k0 = 0; k0 < K; k0 += kStepBytes) {
    for (int i = tid; i < kTile * kStepWords; i += 256) {
      const int r = i / kStepWords, c = i % kStepWords;
      As[r][c] = load_word(A, M, K, m0 + r, k0 + 4 * c);
      Bs[r][c] = load_word(B, N, K, n0 + r, k0 + 4 * c);
    }
    __syncthreads();
#pragma unroll
    for (int c = 0; c < kStepWords; ++c) {
      int a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        a[i] = As[ty + 16 * i][c];
        b[i] = Bs[tx + 16 * i][c];
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = __dp4a(a[i], b[j], acc[i][j]);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t m = m0 + ty + 16 * i;
    if (m >= M) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t n = n0 + tx + 16 * j;
      if (n < N) C[m * N + n] = acc[i][j];
    }
  }
}

// The grid's y dimension holds the column tiles (at most 65535 on a GPU).
constexpr int64_t kGemmMaxN = 65535 * kTile;

void launch_int8_gemm(const int8_t* A, const int8_t* B, int32_t* C, int64_t M, int64_t N, int64_t K,
                      cudaStream_t stream) {
  if (M == 0 || N == 0) return;
  BNBX_CUDA_ASSERT(N <= kGemmMaxN && ceil_div(M, kTile) <= 2147483647, "int8 GEMM: unchecked size for the grid");
  const dim3 grid(static_cast<unsigned int>(ceil_div(M, kTile)), static_cast<unsigned int>(ceil_div(N, kTile)));
  launch_kernel(gemm_dp4a_kernel, grid, 256, stream, A, B, C, M, N, K);
}

// ---- epilogue ---------------------------------------------------------------------------------------------------
template <typename T>
__global__ void mm_dequant_kernel(const int32_t* __restrict__ C, const float* __restrict__ row_stats,
                                  const float* __restrict__ col_stats, const float* __restrict__ bias,
                                  const float* __restrict__ a_out, const float* __restrict__ b_out, int64_t n_out,
                                  T* __restrict__ out, int64_t rows, int64_t N) {
  const int64_t total = rows * N;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t m = i / N, n = i - m * N;
    float t = __fmul_rn(__int2float_rn(C[i]), __fmul_rn(row_stats[m], col_stats[n]));
    t = __fmul_rn(t, kInv127Sq);
    if (bias != nullptr) t = __fadd_rn(t, bias[n]);
    for (int64_t j = 0; j < n_out; ++j) t = __fadd_rn(t, __fmul_rn(a_out[m * n_out + j], b_out[j * N + n]));
    out[i] = from_float<T>(t);
  }
}

// out[rows, N] from the int32 product; bias (fp32, may be null), and n_out outlier columns a_out [rows, n_out] times
// b_out [n_out, N] (both null when n_out = 0).
template <typename T>
void launch_mm_dequant(const int32_t* C, const float* row_stats, const float* col_stats, const float* bias,
                       const float* a_out, const float* b_out, int64_t n_out, T* out, int64_t rows, int64_t N,
                       cudaStream_t stream) {
  if (rows == 0 || N == 0) return;
  auto kernel = mm_dequant_kernel<T>;
  launch_kernel(kernel, grid_size(kernel, ceil_div(rows * N, kElementThreads), kElementThreads), kElementThreads,
                stream, C, row_stats, col_stats, bias, a_out, b_out, n_out, out, rows, N);
}

// ---- quantization launchers ---------------------------------------------------------------------------------------

// mask[K] (zeroed by the caller) gets a 1 in every column of A[rows, K] that holds |x| >= threshold.
template <typename T>
void launch_outlier_columns(const T* A, int64_t rows, int64_t K, float threshold, uint8_t* mask, cudaStream_t stream) {
  if (rows == 0 || K == 0) return;
  auto kernel = outlier_columns_kernel<T>;
  launch_kernel(kernel, grid_size(kernel, ceil_div(rows * K, kElementThreads), kElementThreads), kElementThreads,
                stream, A, rows * K, K, threshold, mask);
}

// q and stats of A[rows, K]; mask (null when there are no outlier columns) zeroes the outlier columns of q.
constexpr int64_t kQuantMaxRows = 2147483647;  // one block per row

template <typename T>
void launch_vectorwise_quant(const T* A, int64_t rows, int64_t K, float threshold, const uint8_t* mask, int8_t* q,
                             float* stats, cudaStream_t stream) {
  if (rows == 0) return;
  BNBX_CUDA_ASSERT(rows <= kQuantMaxRows && K > 0, "int8_vectorwise_quant: unchecked size");
  launch_kernel(vectorwise_quant_kernel<T>, static_cast<unsigned int>(rows), kRowThreads, stream, A, K, threshold, mask,
                q, stats);
}

void launch_vectorwise_dequant(const int8_t* q, const float* stats, int64_t n, int64_t K, float* out,
                               cudaStream_t stream) {
  if (n == 0) return;
  auto kernel = vectorwise_dequant_kernel;
  launch_kernel(kernel, grid_size(kernel, ceil_div(n, kElementThreads), kElementThreads), kElementThreads, stream, q,
                stats, n, K, out);
}

}  // namespace
}  // namespace bnbx::cuda

#if !defined(BNBX_CUDA_EMULATION)
#include <ATen/ops/nonzero.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "../common/checks_int8_matmul.h"
#include "cuda_host.h"

namespace bnbx::cuda {
namespace {

// ---- host ---------------------------------------------------------------------------------------------------------

int64_t leading_rows(const at::Tensor& t) { return c10::multiply_integers(t.sizes().slice(0, t.dim() - 1)); }

void gemm(const int8_t* A, const int8_t* B, int32_t* C, int64_t M, int64_t N, int64_t K, cudaStream_t stream) {
  TORCH_CHECK(N <= kGemmMaxN, "int8_linear_matmul: N = ", N, " is too large for the CUDA grid (at most ", kGemmMaxN,
              ")");
  launch_int8_gemm(A, B, C, M, N, K, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void mm_dequant(const int32_t* C, const float* row_stats, const float* col_stats, const c10::optional<at::Tensor>& bias,
                const float* a_out, const float* b_out, int64_t n_out, at::Tensor& out, int64_t rows, int64_t N,
                cudaStream_t stream) {
  if (rows == 0 || N == 0) return;
  const at::Tensor bias32 = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const float* bias_ptr = bias32.defined() ? bias32.const_data_ptr<float>() : nullptr;
  dispatch_float(out.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    launch_mm_dequant<T>(C, row_stats, col_stats, bias_ptr, a_out, b_out, n_out,
                         static_cast<T*>(out.mutable_data_ptr()), rows, N, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// Quantizes the contiguous input[rows, K] into q / stats; returns the outlier columns (int64, maybe empty).
at::Tensor quant_into(const at::Tensor& input, int64_t rows, int64_t K, float threshold, at::Tensor& q,
                      at::Tensor& stats, cudaStream_t stream) {
  at::Tensor cols = at::empty({0}, input.options().dtype(at::kLong));
  if (rows == 0 || K == 0) {
    stats.zero_();
    return cols;
  }
  at::Tensor mask;
  dispatch_float(input.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* in = static_cast<const T*>(input.const_data_ptr());
    if (threshold > 0.0f) {
      mask = at::zeros({K}, input.options().dtype(at::kByte));
      launch_outlier_columns<T>(in, rows, K, threshold, mask.mutable_data_ptr<uint8_t>(), stream);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      cols = at::nonzero(mask).flatten();  // the output size depends on the data: one sync
    }
    const uint8_t* mask_ptr = cols.numel() > 0 ? mask.const_data_ptr<uint8_t>() : nullptr;
    TORCH_CHECK(rows <= kQuantMaxRows, "int8_vectorwise_quant: too many rows for the CUDA grid: ", rows);
    launch_vectorwise_quant<T>(in, rows, K, threshold, mask_ptr, q.mutable_data_ptr<int8_t>(),
                               stats.mutable_data_ptr<float>(), stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return cols;
}

std::vector<int64_t> out_shape(const at::Tensor& A, int64_t N) {
  std::vector<int64_t> shape(A.sizes().begin(), A.sizes().end());
  shape.back() = N;
  return shape;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> int8_vectorwise_quant_cuda(const at::Tensor& A, double threshold) {
  check_int8_vectorwise_quant_args(A, threshold);
  const c10::cuda::CUDAGuard guard(A.device());
  const at::Tensor input = A.contiguous();
  const int64_t K = input.size(-1), rows = leading_rows(input);
  at::Tensor q = at::empty(input.sizes(), input.options().dtype(at::kChar));
  at::Tensor stats = at::empty({rows}, input.options().dtype(at::kFloat));
  at::Tensor cols = quant_into(input, rows, K, threshold_in_dtype(threshold, input.scalar_type()), q, stats,
                               c10::cuda::getCurrentCUDAStream());
  return {q, stats, cols};
}

at::Tensor int8_vectorwise_dequant_cuda(const at::Tensor& A, const at::Tensor& stats) {
  check_int8_vectorwise_dequant_args(A, stats);
  const c10::cuda::CUDAGuard guard(A.device());
  const at::Tensor q = A.contiguous();
  const at::Tensor s = stats.contiguous();
  at::Tensor out = at::empty(q.sizes(), q.options().dtype(at::kFloat));
  const int64_t n = q.numel();
  if (n == 0) return out;
  launch_vectorwise_dequant(q.const_data_ptr<int8_t>(), s.const_data_ptr<float>(), n, q.size(-1),
                            out.mutable_data_ptr<float>(), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor int8_linear_matmul_cuda(const at::Tensor& A, const at::Tensor& B) {
  check_int8_linear_matmul_args(A, B);
  const c10::cuda::CUDAGuard guard(A.device());
  const at::Tensor a = A.contiguous();
  const at::Tensor b = B.contiguous();
  const int64_t K = a.size(-1), N = b.size(0), rows = leading_rows(a);
  at::Tensor C = at::empty(out_shape(a, N), a.options().dtype(at::kInt));
  gemm(a.const_data_ptr<int8_t>(), b.const_data_ptr<int8_t>(), C.mutable_data_ptr<int32_t>(), rows, N, K,
       c10::cuda::getCurrentCUDAStream());
  return C;
}

at::Tensor int8_mm_dequant_cuda(const at::Tensor& A, const at::Tensor& row_stats, const at::Tensor& col_stats,
                                c10::optional<at::ScalarType> dtype, const c10::optional<at::Tensor>& bias) {
  const at::ScalarType out_dtype = dtype.value_or(at::kHalf);
  check_int8_mm_dequant_args(A, row_stats, col_stats, out_dtype, bias);
  const c10::cuda::CUDAGuard guard(A.device());
  const at::Tensor C = A.contiguous();
  const at::Tensor rs = row_stats.contiguous();
  const at::Tensor cs = col_stats.contiguous();
  at::Tensor out = at::empty(C.sizes(), C.options().dtype(out_dtype));
  mm_dequant(C.const_data_ptr<int32_t>(), rs.const_data_ptr<float>(), cs.const_data_ptr<float>(), bias, nullptr,
             nullptr, 0, out, leading_rows(C), C.size(-1), c10::cuda::getCurrentCUDAStream());
  return out;
}

at::Tensor int8_mixed_linear_cuda(const at::Tensor& A, const at::Tensor& CB, const at::Tensor& SCB,
                                  const c10::optional<at::Tensor>& bias, double threshold) {
  check_int8_mixed_linear_args(A, CB, SCB, bias, threshold);
  const c10::cuda::CUDAGuard guard(A.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor input = A.contiguous();
  const at::Tensor weight = CB.contiguous();
  const at::Tensor scb = SCB.contiguous();
  const int64_t K = input.size(-1), N = weight.size(0), rows = leading_rows(input);
  at::Tensor out = at::empty(out_shape(input, N), input.options());
  if (rows == 0 || N == 0) return out;
  at::Tensor q = at::empty({rows, K}, input.options().dtype(at::kChar));
  at::Tensor stats = at::empty({rows}, input.options().dtype(at::kFloat));
  const at::Tensor cols =
      quant_into(input, rows, K, threshold_in_dtype(threshold, input.scalar_type()), q, stats, stream);
  at::Tensor C = at::empty({rows, N}, input.options().dtype(at::kInt));
  gemm(q.const_data_ptr<int8_t>(), weight.const_data_ptr<int8_t>(), C.mutable_data_ptr<int32_t>(), rows, N, K, stream);
  const int64_t n_out = cols.numel();
  at::Tensor a_out, b_out;
  if (n_out > 0) {
    a_out = input.reshape({rows, K}).index_select(1, cols).to(at::kFloat).contiguous();
    b_out = weight.index_select(1, cols)
                .to(at::kFloat)
                .mul(scb.reshape({N, 1}))
                .mul_(7.874015718698502e-3)
                .t()
                .contiguous();
  }
  if (n_out > kFusedOutliers) {
    at::Tensor out32 = at::empty({rows, N}, input.options().dtype(at::kFloat));
    mm_dequant(C.const_data_ptr<int32_t>(), stats.const_data_ptr<float>(), scb.const_data_ptr<float>(), bias, nullptr,
               nullptr, 0, out32, rows, N, stream);
    out32.addmm_(a_out, b_out);
    out.copy_(out32.view(out.sizes()));
    return out;
  }
  mm_dequant(C.const_data_ptr<int32_t>(), stats.const_data_ptr<float>(), scb.const_data_ptr<float>(), bias,
             n_out ? a_out.const_data_ptr<float>() : nullptr, n_out ? b_out.const_data_ptr<float>() : nullptr, n_out,
             out, rows, N, stream);
  return out;
}

}  // namespace
}  // namespace bnbx::cuda

TORCH_LIBRARY_IMPL(bnbx, CUDA, m) {
  m.impl("int8_vectorwise_quant", &bnbx::cuda::int8_vectorwise_quant_cuda);
  m.impl("int8_vectorwise_dequant", &bnbx::cuda::int8_vectorwise_dequant_cuda);
  m.impl("int8_linear_matmul", &bnbx::cuda::int8_linear_matmul_cuda);
  m.impl("int8_mm_dequant", &bnbx::cuda::int8_mm_dequant_cuda);
  m.impl("int8_mixed_linear", &bnbx::cuda::int8_mixed_linear_cuda);
}
#endif  // !BNBX_CUDA_EMULATION
