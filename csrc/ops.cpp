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

  // --- double quantization (QLoRA's compress_statistics) ---
  // absmax fp32 (any shape) -> q uint8 shaped like absmax, absmax2 fp32 [ceil(n/blocksize)], offset fp32 []:
  // offset = mean of the non-NaN values (accumulated in double, 0 when there are none), then
  // quantize_blockwise(absmax - offset, code, blocksize).
  m.def("double_quantize(Tensor absmax, Tensor code, int blocksize) -> (Tensor, Tensor, Tensor)");
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
                           "dequantize_blockwise", "quantize_int8", "dequantize_int8", "double_quantize"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&cuda_kernels_not_built>());
  }
}
#endif
