"""LSQ / LSQ+ fake quantization (bnbx.qat.fake_quantize_lsq, torch.ops.bnbx.fake_quantize_lsq and its backward):
the fused ops against the plain-torch formula (tests/reference_fake_quant.py) bit for bit, every CPU instruction
set, deterministic gradient sums, autograd, opcheck, torch.compile and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DEVICES, cpu_isa, cpu_supports, dtype_id, isa_params
from reference_fake_quant import lsq_ref, lsq_torch, lsq_torch_backward

from bnbx.qat import fake_quantize, fake_quantize_lsq, lsq_init_scale

LSQ_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)


ISAS = isa_params("scalar", "avx2", "avx512")

# (x shape, scale shape, offset shape): per row of a weight, per tensor, per token, elementwise, leading ones,
# odd sizes, a row longer than one backward segment (32768 elements), empty tensors
LAYOUTS = [
    ((37, 301), (37, 1), (37, 1)),
    ((37, 301), (37, 1), ()),
    ((3, 5, 33), (), ()),
    ((3, 5, 33), (3, 5, 1), (1,)),
    ((4, 7), (4, 7), (4, 7)),
    ((1, 4, 9), (4, 1), (1, 1)),
    ((2, 40000), (1, 1), (2, 1)),
    ((13,), (1,), (13,)),
    ((0, 16), (0, 1), (0, 1)),
    ((4, 0), (4, 1), ()),
]


def _inputs(shape, scale_shape, offset_shape, dtype, device="cpu"):
    x = torch.randn(shape, device=device) * 3
    if x.numel() > 30:
        flat = x.view(-1)
        flat[:4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0])
        flat[4:12] = torch.tensor([0.125, -0.375, 0.625, 1.125, 40.0, -40.0, -0.0, 1e-40])
    scale = (torch.rand(scale_shape, device=device) * 0.5 + 0.1).to(torch.float32)
    offset = torch.randn(offset_shape, device=device) * 0.05
    if x.numel() > 30 and scale.numel() == 1:
        scale.fill_(0.25)  # 0.125 / 0.25 = 0.5 exactly: ties go to even
    return x.to(dtype), scale, offset


@pytest.mark.parametrize("isa_name", ISAS)
@pytest.mark.parametrize("dtype", LSQ_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda t: f"{t[0]}-{t[1]}-{t[2]}")
def test_matches_torch_formula(isa_name, dtype, layout):
    x, scale, offset = _inputs(*layout, dtype)
    qmin, qmax = (-8.0, 7.0) if x.numel() % 2 else (-7.0, 7.0)
    grad = torch.randn(x.shape).to(dtype)
    with cpu_isa(isa_name):
        out = torch.ops.bnbx.fake_quantize_lsq(x, scale, offset, qmin, qmax, 0.3)
        grad_x, grad_s, grad_o = torch.ops.bnbx.fake_quantize_lsq_backward(grad, x, scale, offset, qmin, qmax, 0.3)
    assert_same(out, lsq_torch(x, scale, offset, qmin, qmax))
    ref_x, ref_s, ref_o = lsq_torch_backward(grad, x, scale, offset, qmin, qmax, 0.3, sums_in_double=True)
    assert_same(grad_x, ref_x)
    assert grad_s.shape == scale.shape and grad_s.dtype == scale.dtype
    assert grad_o.shape == offset.shape and grad_o.dtype == offset.dtype
    # only the summation order differs from the double sums of the reference
    torch.testing.assert_close(grad_s.double(), ref_s, rtol=1e-6, atol=1e-9, equal_nan=True)
    torch.testing.assert_close(grad_o.double(), ref_o, rtol=1e-6, atol=1e-9, equal_nan=True)
    # and from the plain-torch implementation (fp32 sums) up to its rounding
    _, old_s, old_o = lsq_torch_backward(grad, x, scale, offset, qmin, qmax, 0.3)
    torch.testing.assert_close(grad_s, old_s, rtol=1e-4, atol=1e-4, equal_nan=True)
    torch.testing.assert_close(grad_o, old_o, rtol=1e-4, atol=1e-4, equal_nan=True)


@pytest.mark.parametrize("dtype", LSQ_DTYPES[:3], ids=dtype_id)
def test_same_bits_on_every_isa_and_thread_count(dtype):
    supported = [n for n in ("scalar", "avx2", "avx512") if cpu_supports(n)]
    results = []
    threads = torch.get_num_threads()
    # the last two are >= 8 MiB: streamed stores, odd rows starting off their alignment
    for shape, scale_shape in [((3, 70001), ()), ((6, 40000), (6, 1)), ((4, 1100003), ()), ((2048, 4099), (2048, 1))]:
        x, scale, offset = _inputs(shape, scale_shape, (), dtype)
        grad = torch.randn(shape).to(dtype)
        for name in supported:
            for n in (1, 2):
                torch.set_num_threads(n)
                try:
                    with cpu_isa(name):
                        out = torch.ops.bnbx.fake_quantize_lsq(x, scale, offset, -7.0, 7.0)
                        grads = torch.ops.bnbx.fake_quantize_lsq_backward(grad, x, scale, offset, -7.0, 7.0, 0.01)
                finally:
                    torch.set_num_threads(threads)
                results.append((shape, name, n, out, *grads))
    for shape, name, n, *tensors in results:
        first = next(r for r in results if r[0] == shape)
        for actual, expected in zip(tensors, first[3:]):
            assert_same(actual, expected)


# --- autograd ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lsq_plus_gradients_match_plain_autograd(dtype):
    x = (torch.randn(5, 40, dtype=dtype) * 2).requires_grad_()
    scale = lsq_init_scale(x, 4, "channel", "mean").to(dtype).requires_grad_()
    offset = (torch.randn(5, 1, dtype=dtype) * 0.1).requires_grad_()
    out = fake_quantize_lsq(x, scale, offset, bits=4, grad_scale=0.37)
    upstream = torch.randn_like(out)
    out.backward(upstream)
    leaves = [t.detach().clone().requires_grad_() for t in (x, scale, offset)]
    ref = lsq_ref(*leaves, -7.0, 7.0, 0.37)  # the detach-trick surrogate: STE on round, LSQ scale gradient
    ref.backward(upstream)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, ref, **tol)
    for ours, theirs in zip((x, scale, offset), leaves):
        torch.testing.assert_close(ours.grad, theirs.grad, **tol)


def test_gradcheck_fp64_outside_the_grid():
    # Inside the grid the LSQ gradient is a straight-through surrogate, not the derivative of the piecewise
    # constant forward, so finite differences cannot judge it there (test above). Outside the grid (clamped)
    # it is the true derivative: 0 for x, qmin or qmax for the scale, 1 for the offset; gradcheck that in fp64.
    x = torch.randn(6, 9, dtype=torch.float64) * 3
    x = torch.where(x.abs() < 1.0, x.sign() * 2 + x, x) * 10
    scale = torch.full((6, 1), 0.1, dtype=torch.float64, requires_grad=True)
    offset = torch.zeros((6, 1), dtype=torch.float64, requires_grad=True)
    x.requires_grad_()
    fn = lambda a, s, o: fake_quantize_lsq(a, s, o, bits=4, grad_scale=1.0)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, scale, offset))
    assert torch.autograd.gradcheck(lambda s: fake_quantize_lsq(x.detach(), s, bits=3, grad_scale=1.0), (scale,))


def test_default_grad_scale_and_no_offset():
    w = torch.randn(8, 50, requires_grad=True)
    s = lsq_init_scale(w, 4, "channel", "minmax").requires_grad_()
    grad = torch.randn(8, 50)
    fake_quantize_lsq(w, s, bits=4).backward(grad)
    _, ref_s, _ = lsq_torch_backward(grad, w.detach(), s.detach(), torch.zeros(()), -7.0, 7.0, (400 * 7) ** -0.5)
    torch.testing.assert_close(s.grad, ref_s, rtol=1e-5, atol=1e-7)
    # LSQ with the MinMax scale is RTN: the same values as the MinMax kernel
    assert torch.equal(fake_quantize_lsq(w, s, bits=4), fake_quantize(w, 4, True, "channel"))


def test_opcheck():
    for dtype in LSQ_DTYPES:
        x = torch.randn(4, 33, dtype=dtype, requires_grad=True)
        s = torch.full((4, 1), 0.2, requires_grad=True)
        o = torch.zeros((), requires_grad=True)
        torch.library.opcheck(torch.ops.bnbx.fake_quantize_lsq.default, (x, s, o, -7.0, 7.0, 0.1))
        args = (torch.randn(4, 33, dtype=dtype), x.detach(), s.detach(), o.detach(), -7.0, 7.0, 0.1)
        torch.library.opcheck(torch.ops.bnbx.fake_quantize_lsq_backward.default, args)


def test_compile_fullgraph():
    fn = torch.compile(lambda t, s: fake_quantize_lsq(t, s, bits=4) * 2, fullgraph=True, backend="aot_eager")
    x, s = torch.randn(3, 16, requires_grad=True), torch.full((3, 1), 0.3, requires_grad=True)
    out = fn(x, s)
    assert torch.equal(out, fake_quantize_lsq(x, s, bits=4) * 2)
    out.sum().backward()
    assert s.grad is not None and x.grad is not None


@pytest.mark.parametrize("device", DEVICES)
def test_devices_agree(device):
    # the CUDA kernels against the formula (skipped without a GPU); sums in another order, so close, not equal
    for dtype in LSQ_DTYPES:
        x, scale, offset = _inputs((9, 4500), (9, 1), (), dtype, device)
        grad = torch.randn(x.shape, device=device).to(dtype)
        out = torch.ops.bnbx.fake_quantize_lsq(x, scale, offset, -8.0, 7.0)
        assert_same(out, lsq_torch(x, scale, offset, -8.0, 7.0))
        grad_x, grad_s, grad_o = torch.ops.bnbx.fake_quantize_lsq_backward(grad, x, scale, offset, -8.0, 7.0, 0.5)
        ref_x, ref_s, ref_o = lsq_torch_backward(grad, x, scale, offset, -8.0, 7.0, 0.5, sums_in_double=True)
        assert_same(grad_x, ref_x)
        torch.testing.assert_close(grad_s.double(), ref_s, rtol=1e-6, atol=1e-9, equal_nan=True)
        torch.testing.assert_close(grad_o.double(), ref_o, rtol=1e-6, atol=1e-9, equal_nan=True)


# --- bad input -----------------------------------------------------------------------------------------------------


def test_bad_shapes_and_dtypes():
    x = torch.randn(4, 10)
    op = torch.ops.bnbx.fake_quantize_lsq
    for call in (lambda s: fake_quantize_lsq(x, s), lambda s: op(x, s, torch.zeros(()), -7.0, 7.0)):
        for bad in (torch.ones(3, 1), torch.ones(1, 10), torch.ones(10), torch.ones(4)):
            with pytest.raises(ValueError, match=r"must hold one value or one per row of x of shape \[4, 10\]"):
                call(bad)
        with pytest.raises(ValueError, match="scale has more dimensions"):
            call(torch.ones(1, 1, 1))
        with pytest.raises(TypeError, match="scale must be float32, float16, bfloat16 or float64, got int32"):
            call(torch.ones(4, 1, dtype=torch.int32))
    with pytest.raises(TypeError, match="x must be float32, float16, bfloat16 or float64, got int64"):
        fake_quantize_lsq(torch.ones(4, 10, dtype=torch.long), torch.ones(4, 1))
    with pytest.raises(TypeError, match="x must be float32, float16, bfloat16 or float64, got int64"):
        op(torch.ones(4, 10, dtype=torch.long), torch.ones(4, 1), torch.zeros(()), -7.0, 7.0)
    with pytest.raises(TypeError, match="scale must be a torch.Tensor"):
        fake_quantize_lsq(x, 0.1)
    with pytest.raises(ValueError, match="offset of shape \\[3\\]"):
        fake_quantize_lsq(x, torch.ones(4, 1), torch.zeros(3))
    with pytest.raises(ValueError, match="must have as many values"):
        op(x, torch.ones(4, 1), torch.zeros(4, 10), -7.0, 7.0)
    with pytest.raises(ValueError, match="qmin and qmax must be finite with qmin < qmax"):
        op(x, torch.ones(4, 1), torch.zeros(()), 7.0, -7.0)
    with pytest.raises(ValueError, match="grad_scale must be finite"):
        op(x, torch.ones(4, 1), torch.zeros(()), -7.0, 7.0, float("inf"))
    with pytest.raises(ValueError, match="bits must be from 2 to 8"):
        fake_quantize_lsq(x, torch.ones(4, 1), bits=9)
    with pytest.raises(ValueError, match="range must be"):
        fake_quantize_lsq(x, torch.ones(4, 1), range="wide")
    with pytest.raises(ValueError, match=r"grad must have x's shape \[4, 10\] and dtype float32"):
        torch.ops.bnbx.fake_quantize_lsq_backward(x.half(), x, torch.ones(4, 1), torch.zeros(()), -7.0, 7.0, 1.0)


@pytest.mark.parametrize("bad", [0.0, -0.5, float("nan"), float("inf")])
def test_bad_scale_values(bad):
    x = torch.randn(4, 10, requires_grad=True)
    scale = torch.full((4, 1), 0.2)
    scale[2] = bad
    with pytest.raises(ValueError, match=r"scale must be positive and finite, got .* at index 2"):
        fake_quantize_lsq(x, scale)
    with pytest.raises(ValueError, match=r"scale must be positive and finite"):
        torch.ops.bnbx.fake_quantize_lsq_backward(x.detach(), x.detach(), scale, torch.zeros(()), -7.0, 7.0, 1.0)
    if not math.isfinite(bad):
        with pytest.raises(ValueError, match=r"offset must be finite, got .* at index 0"):
            fake_quantize_lsq(x, torch.full((4, 1), 0.2), torch.full((1,), bad))


def test_empty_and_zero_dim():
    x = torch.randn(0, 16, requires_grad=True)
    s = torch.ones(0, 1, requires_grad=True)
    out = fake_quantize_lsq(x, s)
    out.sum().backward()
    assert out.shape == (0, 16) and s.grad.shape == (0, 1)
    scalar = torch.tensor(0.37, requires_grad=True)
    one = torch.tensor(0.1, requires_grad=True)
    out = fake_quantize_lsq(scalar, one, bits=4)
    assert_same(out, lsq_torch(scalar.detach(), one.detach(), torch.zeros(()), -7.0, 7.0))
    out.backward()
    assert scalar.grad == 1.0 and one.grad.shape == ()


# --- the CUDA kernels through the host emulation (tests/cuda_emulation.py), where no GPU is lent ----------------


@pytest.mark.parametrize("dtype", LSQ_DTYPES, ids=dtype_id)
@pytest.mark.parametrize(
    "layout",
    [((3, 4500), (3, 1), ()), ((2, 4097), (), (2, 1)), ((5, 7), (5, 1), (5, 1)), ((0, 8), (0, 1), ())],
    ids=lambda t: f"{t[0]}-{t[1]}-{t[2]}",
)
def test_cuda_kernels_emulated(dtype, layout):
    from cuda_emulation import compiler, load

    if compiler() is None:
        pytest.skip("the CUDA emulation needs g++")
    emu = load()
    x, scale, offset = _inputs(*layout, dtype)
    grad = torch.randn(x.shape).to(dtype)
    out = emu.fake_quantize_lsq(x, scale, offset, -8.0, 7.0)
    assert_same(out, torch.ops.bnbx.fake_quantize_lsq(x, scale, offset, -8.0, 7.0))
    grad_x, grad_s, grad_o = emu.fake_quantize_lsq_backward(grad, x, scale, offset, -8.0, 7.0, 0.5)
    ref_x, ref_s, ref_o = lsq_torch_backward(grad, x, scale, offset, -8.0, 7.0, 0.5, sums_in_double=True)
    assert_same(grad_x, ref_x)
    if x.numel():
        torch.testing.assert_close(grad_s.view(ref_s.shape), ref_s, rtol=1e-9, atol=1e-12, equal_nan=True)
        torch.testing.assert_close(grad_o.view(ref_o.shape), ref_o, rtol=1e-9, atol=1e-12, equal_nan=True)


def test_cuda_bad_scale_rows_are_nan_emulated():
    # CUDA does not check scale values (no synchronization): such rows come out NaN, and their gradient NaN
    from cuda_emulation import compiler, load

    if compiler() is None:
        pytest.skip("the CUDA emulation needs g++")
    emu = load()
    x, grad = torch.randn(4, 50), torch.randn(4, 50)
    scale, offset = torch.tensor([[0.2], [0.0], [-0.3], [float("nan")]]), torch.zeros(())
    out = emu.fake_quantize_lsq(x, scale, offset, -7.0, 7.0)
    assert torch.equal(out[0], lsq_torch(x[0], scale[0], offset, -7.0, 7.0)) and out[1:].isnan().all()
    _, grad_s, _ = emu.fake_quantize_lsq_backward(grad, x, scale, offset, -7.0, 7.0, 1.0)
    assert grad_s[0].isfinite() and grad_s[1:].isnan().all()


def test_non_contiguous_inputs():
    x = (torch.randn(40, 30) * 3).t()  # [30, 40], strided
    scale = torch.rand(30, 2)[:, :1] + 0.1  # [30, 1], strided
    grad = torch.randn(40, 30).t()
    out = torch.ops.bnbx.fake_quantize_lsq(x, scale, torch.zeros(()), -7.0, 7.0)
    assert out.is_contiguous() and out.shape == x.shape
    assert_same(out, lsq_torch(x, scale, torch.zeros(()), -7.0, 7.0))
    grad_x, grad_s, _ = torch.ops.bnbx.fake_quantize_lsq_backward(grad, x, scale, torch.zeros(()), -7.0, 7.0, 1.0)
    ref_x, ref_s, _ = lsq_torch_backward(grad, x, scale, torch.zeros(()), -7.0, 7.0, 1.0, sums_in_double=True)
    assert_same(grad_x, ref_x)
    torch.testing.assert_close(grad_s.double(), ref_s, rtol=1e-6, atol=1e-9)  # rounded to scale's fp32


@pytest.mark.parametrize("isa_name", ISAS)
def test_fp16_overflow_as_the_formula(isa_name):
    # 65000 / 40000 rounds to code 2: 80000 does not fit fp16 and becomes Inf, as the formula's .to(float16)
    x = torch.tensor([[65000.0, -65000.0, 30000.0] * 6], dtype=torch.float16)
    scale = torch.full((1, 1), 40000.0)
    with cpu_isa(isa_name):
        out = torch.ops.bnbx.fake_quantize_lsq(x, scale, torch.zeros(()), -7.0, 7.0)
    assert_same(out, lsq_torch(x, scale, torch.zeros(()), -7.0, 7.0))
    assert out.isinf().sum() == 12
