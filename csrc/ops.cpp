// Every bnbx op schema, in one place. Each device file registers its kernels at its own end
// (TORCH_LIBRARY_IMPL in cpu/*.cpp and cuda/*.cu); the fake (meta) kernels live in bnbx/_ops.py, which
// set_python_module names so torch can find them. Loading _C.so runs these initialisers.
#include <torch/library.h>

TORCH_LIBRARY(bnbx, m) {
  m.set_python_module("bnbx._ops");

  // 4-bit blockwise (NF4/FP4): A (any shape, fp32/fp16/bf16) -> packed codes [ceil(ceil(n/2)/itemsize), 1]
  // of dtype quant_storage (byte j: element 2j high nibble, 2j+1 low), absmax fp32 [ceil(n/blocksize)].
  m.def("quantize_4bit(Tensor A, int blocksize, str quant_type, ScalarType quant_storage) -> (Tensor, Tensor)");
  // Inverse of quantize_4bit: code * absmax in fp32, one rounding to dtype, reshaped to `shape`.
  m.def(
      "dequantize_4bit(Tensor A, Tensor absmax, int blocksize, str quant_type, int[] shape, ScalarType dtype)"
      " -> Tensor");
  m.def(
      "dequantize_4bit.out(Tensor A, Tensor absmax, int blocksize, str quant_type, int[] shape, "
      "ScalarType dtype, *, Tensor(a!) out) -> ()");

  // 8-bit blockwise with a sorted 256-value code (the signed dynamic map): codes uint8 shaped like A,
  // absmax fp32 [ceil(n/blocksize)]. Used to double-quantize 4-bit absmax values.
  m.def("quantize_blockwise(Tensor A, Tensor code, int blocksize) -> (Tensor, Tensor)");
  m.def("dequantize_blockwise(Tensor A, Tensor absmax, Tensor code, int blocksize, ScalarType dtype) -> Tensor");

  // int8 over contiguous groups of group_size elements of the flattened A: q int8 shaped like A, scale fp32
  // and zero_point int32 [ceil(n/group_size)]. symmetric: absmax/127 scale, zero_point 0, q in [-127, 127].
  m.def("quantize_int8(Tensor A, int group_size, bool symmetric) -> (Tensor, Tensor, Tensor)");
  m.def("dequantize_int8(Tensor A, Tensor scale, Tensor zero_point, int group_size, ScalarType dtype) -> Tensor");

  // --- gemm_4bit: products with a packed 4-bit weight ----------------------------------------------------------
  // out [..., N] (A's dtype) = A [..., K] @ W^T + bias, W [N, K] = shape the packed 4-bit weight B (any
  // quant_storage, bytes ceil(N*K/2)) with absmax fp32 [ceil(N*K/blocksize)], or with double quantization
  // absmax uint8 decoded as nested_code[absmax] * nested_absmax[block / nested_blocksize] + nested_offset.
  // Accumulates in fp32 (GEMV for small M) or in A's dtype's GEMM on dequantized tiles (larger M).
  m.def(
      "gemm_4bit(Tensor A, Tensor B, Tensor absmax, int blocksize, str quant_type, int[] shape, "
      "Tensor? bias=None, Tensor? nested_absmax=None, Tensor? nested_code=None, Tensor? nested_offset=None, "
      "int nested_blocksize=256) -> Tensor");

  // ---- LLM.int8() (bitsandbytes' names and semantics) ----
  // A float [..., K] -> q int8 like A, row_stats fp32 [rows] (absmax over |x| < threshold), outlier_cols
  // int64 [n_out]: columns with any |x| >= threshold (threshold > 0), zero in q. q = round(x * 127 / stat).
  m.def("int8_vectorwise_quant(Tensor A, float threshold=0.0) -> (Tensor, Tensor, Tensor)");
  // float(A) * stats[row] / 127 -> fp32 like A
  m.def("int8_vectorwise_dequant(Tensor A, Tensor stats) -> Tensor");
  // A int8 [..., K], B int8 [N, K] -> int32 [..., N] = A @ B^T, exact
  m.def("int8_linear_matmul(Tensor A, Tensor B) -> Tensor");
  // A int32 [..., N] -> A * row_stats * col_stats / 127^2 + bias, in dtype (None: float16, as bitsandbytes)
  m.def(
      "int8_mm_dequant(Tensor A, Tensor row_stats, Tensor col_stats, ScalarType? dtype=None, Tensor? bias=None)"
      " -> Tensor");
  // The whole layer: A float [..., K], weight CB int8 [N, K] with row absmax SCB fp32 [N] -> A.dtype [..., N];
  // int8 product of the normal columns + fp32 product of the outlier columns, bias, one write.
  m.def("int8_mixed_linear(Tensor A, Tensor CB, Tensor SCB, Tensor? bias=None, float threshold=0.0) -> Tensor");
  // CPU only: CB int8 [N, K] -> uint8 [16 ceil(N/16) * 64 ceil(K/64)], the AMX tile layout of the weight (the
  // layer caches it), and int8_mixed_linear taking it next to CB (used on the AMX route, CB elsewhere).
  m.def("int8_pack_weight(Tensor CB) -> Tensor");
  m.def(
      "int8_mixed_linear_packed(Tensor A, Tensor CB, Tensor packed_CB, Tensor SCB, Tensor? bias=None, "
      "float threshold=0.0) -> Tensor");
  // --- fake_quant (QAT) ---------------------------------------------------------------------------------
  // Integer fake quantization with dynamic MinMax scales over contiguous groups of group_size elements of
  // the flattened x (the last group may be partial): out shaped and typed like x, scale fp32 and zero_point
  // int32 [ceil(n/group_size)]. Grid: bits 2..8, restricted +-(2^(b-1)-1) or full [-2^(b-1), 2^(b-1)-1];
  // rules in common/rules.h (8 bits: exactly quantize_int8 + dequantize_int8). Differentiable (bnbx/_ops_qat.py):
  // straight-through, masked where the code was clamped (mask 'range'), where |x| >= clip ('absolute'), or
  // not at all ('none').
  m.def(
      "fake_quantize(Tensor x, int group_size, int bits, bool symmetric, bool full_range, str mask, float clip)"
      " -> (Tensor, Tensor, Tensor)");
  // --- double quantization (QLoRA's compress_statistics) ---
  // absmax fp32 (any shape) -> q uint8 shaped like absmax, absmax2 fp32 [ceil(n/blocksize)], offset fp32 []:
  // offset = mean of the non-NaN values (accumulated in double, 0 when there are none), then
  // quantize_blockwise(absmax - offset, code, blocksize).
  m.def("double_quantize(Tensor absmax, Tensor code, int blocksize) -> (Tensor, Tensor, Tensor)");
  // --- fake_quant_lsq (QAT: LSQ / LSQ+, learned scale and offset) ----------------------------------------
  // x fp32/fp16/bf16/fp64; scale, offset float: one value, or one per row (x's leading sizes followed by
  // ones, e.g. [out, 1] for a weight [out, in]). out like x = clamp(round((x - offset) * (1 / scale)), qmin,
  // qmax) * scale + offset in fp32 (fp64 for fp64 x), rules in common/rules.h. A scale must be positive and
  // finite (checked on the CPU). grad_scale only scales the scale's gradient (LSQ's 1/sqrt(N * Qp)); the
  // forward does not read it. Differentiable (bnbx/_ops_qat.py) through fake_quantize_lsq_backward.
  m.def(
      "fake_quantize_lsq(Tensor x, Tensor scale, Tensor offset, float qmin, float qmax, float grad_scale=1.0)"
      " -> Tensor");
  // One pass over x and grad: grad_x like x (grad inside the grid, 0 outside), grad_scale like scale (LSQ's
  // slope round(v) - v inside, qmin below, qmax above, summed per row or per tensor, times grad_scale) and
  // grad_offset like offset (grad summed outside the grid). Sums in double, in an order fixed by the shape.
  m.def(
      "fake_quantize_lsq_backward(Tensor grad, Tensor x, Tensor scale, Tensor offset, float qmin, float qmax, "
      "float grad_scale) -> (Tensor, Tensor, Tensor)");
  // --- lora (bnbx.lora: a LoRA adapter of a linear layer) ---------------------------------------------------
  // x [..., K] (the adapter's input), base [..., N] (the base layer's output, x's leading sizes), lora_A [r, K],
  // lora_B [N, r] (one dtype); all fp32/fp16/bf16, any mix. out like base = base + hidden @ lora_B^T with
  // hidden = scaling * (x @ lora_A^T): products and sum in fp32, one rounding. Differentiable (bnbx/_ops_lora.py)
  // in x, base, lora_A and lora_B through lora_backward.
  m.def("lora_forward(Tensor x, Tensor base, Tensor lora_A, Tensor lora_B, float scaling) -> Tensor");
  // For grad_out like base: grad_hidden = scaling * (grad_out @ lora_B) and hidden as above, in fp32;
  // grad_x like x = grad_hidden @ lora_A (an empty [0] tensor when input_grad is false), grad_A like lora_A =
  // grad_hidden^T @ x, grad_B like lora_B = grad_out^T @ hidden, each summed in fp32 and rounded once.
  m.def(
      "lora_backward(Tensor grad_out, Tensor x, Tensor lora_A, Tensor lora_B, float scaling, bool input_grad) -> "
      "(Tensor, Tensor, Tensor)");
}

// Ops with a CPU kernel only (every build): CUDA tensors get a clear error.
#include <ATen/core/dispatch/Dispatcher.h>

namespace {

void cpu_only_op(const c10::OperatorHandle& op, torch::jit::Stack*) {
  TORCH_CHECK(false, op.schema().name(), ": runs on the CPU only (the AMX weight layout); got CUDA tensors");
}

}  // namespace

TORCH_LIBRARY_IMPL(bnbx, CUDA, m) {
  for (const char* name : {"int8_pack_weight", "int8_mixed_linear_packed"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&cpu_only_op>());
  }
}

#ifndef BNBX_WITH_CUDA
// A CPU-only build registers, for CUDA tensors, a kernel that says how to get the CUDA one, instead of the
// dispatcher's generic "could not run ... with arguments from the 'CUDA' backend".
#include <ATen/core/dispatch/Dispatcher.h>

namespace {

void cuda_kernels_not_built(const c10::OperatorHandle& op, torch::jit::Stack*) {
  TORCH_CHECK(false, op.schema().name(),
              ": got CUDA tensors, but this bnbx was built without CUDA kernels. Rebuild it against a CUDA torch "
              "with nvcc on PATH: pip install --no-build-isolation . (BNBX_CUDA=ON makes a missing toolkit an error)");
}

}  // namespace

TORCH_LIBRARY_IMPL(bnbx, CUDA, m) {
  for (const char* name : {"quantize_4bit", "dequantize_4bit", "dequantize_4bit.out", "quantize_blockwise",
                           "dequantize_blockwise", "quantize_int8", "dequantize_int8", "double_quantize", "gemm_4bit",
                           "int8_vectorwise_quant", "int8_vectorwise_dequant", "int8_linear_matmul", "int8_mm_dequant",
                           "int8_mixed_linear", "fake_quantize", "fake_quantize_lsq", "fake_quantize_lsq_backward"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&cuda_kernels_not_built>());
  }
}
#endif
