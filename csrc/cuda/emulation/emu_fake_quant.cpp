// MinMax and LSQ / LSQ+ kernels of csrc/cuda/fake_quant.cu, compiled as C++ for the host emulation (see
// emulator.h); its torch part is left out.
#include "../fake_quant.cu"

#include <vector>

#include "emulator.h"

namespace {

// dtype codes of emulator.h, and 3 for float64 (LSQ takes fp64 x; scales and offsets are then double).
template <typename F>
int run_lsq(int dtype, const F& f) {
  if (dtype != 3) return bnbx::emu::run(dtype, f);
  bnbx::emu::last_error() = {};
  f(double{});
  return bnbx::emu::last_error().set ? 1 : 0;
}

}  // namespace

extern "C" int bnbx_emu_fake_quantize_lsq(int dtype, const void* in, void* out, int64_t rows, int64_t inner,
                                          int scale_per_row, int offset_per_row, const void* scale, const void* offset,
                                          double qmin, double qmax) {
  return run_lsq(dtype, [&](auto tag) {
    using T = decltype(tag);
    using C = bnbx::cuda::LsqC<T>;
    const bnbx::cuda::LsqShape shape = bnbx::cuda::lsq_shape(rows, inner, scale_per_row != 0, offset_per_row != 0);
    bnbx::cuda::launch_fake_quantize_lsq<T>(static_cast<const T*>(in), static_cast<T*>(out), shape,
                                            static_cast<const C*>(scale), static_cast<const C*>(offset),
                                            static_cast<C>(qmin), static_cast<C>(qmax), nullptr);
  });
}

extern "C" int bnbx_emu_fake_quantize_lsq_backward(int dtype, const void* grad, const void* x, void* grad_x,
                                                   int64_t rows, int64_t inner, int scale_per_row, int offset_per_row,
                                                   const void* scale, const void* offset, double qmin, double qmax,
                                                   double grad_scale, double* scale_grad, double* offset_grad) {
  return run_lsq(dtype, [&](auto tag) {
    using T = decltype(tag);
    using C = bnbx::cuda::LsqC<T>;
    const bnbx::cuda::LsqShape shape = bnbx::cuda::lsq_shape(rows, inner, scale_per_row != 0, offset_per_row != 0);
    // exactly the size the launcher asks for, so ASan sees any overrun of the workspace
    std::vector<double> workspace(bnbx::cuda::lsq_backward_workspace(shape));
    bnbx::cuda::launch_fake_quantize_lsq_backward<T>(
        static_cast<const T*>(grad), static_cast<const T*>(x), static_cast<T*>(grad_x), shape,
        static_cast<const C*>(scale), static_cast<const C*>(offset), static_cast<C>(qmin), static_cast<C>(qmax),
        grad_scale, workspace.data(), scale_grad, offset_grad, nullptr);
  });
}

extern "C" int bnbx_emu_fake_quantize(int dtype, const void* in, void* out, int64_t n, int64_t group_size, int64_t bits,
                                      int symmetric, int full_range, float* scale, int32_t* zero_point,
                                      int64_t* split_segments) {
  return bnbx::emu::run(dtype, [&](auto tag) {
    using T = decltype(tag);
    const bnbx::FakeQuantGrid grid = bnbx::fake_quant_grid(bits, symmetric != 0, full_range != 0);
    // exactly the size the launcher asks for, so ASan sees any overrun of the workspace
    std::vector<bnbx::cuda::FqRange> workspace(bnbx::cuda::fake_quantize_workspace(n, group_size));
    *split_segments = static_cast<int64_t>(workspace.size());
    bnbx::cuda::launch_fake_quantize<T>(static_cast<const T*>(in), static_cast<T*>(out), n, group_size, symmetric != 0,
                                        grid, scale, zero_point, workspace.empty() ? nullptr : workspace.data(),
                                        nullptr);
  });
}
