"""bnbx.qat fake-quant ops: the kernel against the plain-torch reference, the real int8/4-bit ops and torch's
fake_quantize (bit for bit), every CPU instruction set, gradients, opcheck and bad input."""

from __future__ import annotations


import pytest
import torch
from conftest import DEVICES, DTYPES, cpu_isa, dtype_id, isa_params
from reference_fake_quant import fake_quantize_ref, grid, lsq_ref

import bnbx
from bnbx.qat import fake_quantize, fake_quantize_4bit, fake_quantize_lsq, lsq_init_scale


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)


ISAS = isa_params("scalar", "avx2", "avx512")
SHAPES_GROUPS = [((0,), 5), ((1,), 1), ((7,), 3), ((33, 17), 17), ((5, 130), 10), ((3, 1000), 7), ((2, 4100), 4100)]


def _special(shape, dtype):
    x = torch.randn(shape) * torch.exp(torch.randn(shape) * 2)
    if x.numel() > 20:
        flat = x.view(-1)
        flat[3] = 0.0
        flat[5:9] = 1e-40  # subnormal range in some groups
        flat[-1] = -flat.abs().max() * 3
    return x.to(dtype)


@pytest.mark.parametrize("isa_name", ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric,full", [(True, False), (True, True), (False, True), (False, False)])
def test_kernel_matches_reference(isa_name, dtype, bits, symmetric, full):
    with cpu_isa(isa_name):
        for shape, group in SHAPES_GROUPS:
            x = _special(shape, dtype)
            out, scale, zp = torch.ops.bnbx.fake_quantize(x, group, bits, symmetric, full, "none", 2.0)
            ref_out, ref_scale, ref_zp = fake_quantize_ref(x, group, bits, symmetric, full)
            assert_same(out, ref_out)
            assert_same(scale, ref_scale)
            assert torch.equal(zp, ref_zp)


@pytest.mark.parametrize("isa_name", ISAS)
def test_nonfinite_and_zero_groups(isa_name):
    x = torch.randn(6, 40)
    x[1, 3] = float("nan")
    x[2, 0] = float("inf")
    x[3] = 0.0
    x[4] = 2.5  # all equal: zero range for symmetric? no: absmax 2.5; asymmetric range [0, 2.5]
    with cpu_isa(isa_name):
        for symmetric in (True, False):
            out, scale, _ = torch.ops.bnbx.fake_quantize(x, 40, 4, symmetric, not symmetric, "none", 2.0)
            assert out[1].isnan().all() and out[2].isnan().all()
            assert torch.equal(out[3], torch.zeros(40)) and scale[3] == 0
            assert torch.isfinite(out[[0, 3, 4, 5]]).all()
            assert_same(out, fake_quantize_ref(x, 40, 4, symmetric, not symmetric)[0])


@pytest.mark.parametrize("isa_name", ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("symmetric,full", [(True, False), (False, True)])
def test_large_outputs_match_reference(isa_name, dtype, symmetric, full):
    # >= 8 MiB: written with non-temporal stores, each odd-length row starting off the store alignment; rows
    # with a subnormal scale, near the fp32 / fp16 limits, or all zero take the kernel's other branches
    x = torch.randn(2100, 4099) * 3
    x[1] = torch.randn(4099) * 1e-39
    x[2] = torch.randn(4099) * 3e38
    x[3] = torch.randn(4099) * 65000
    x[4] = 0.0
    x = x.to(dtype)
    with cpu_isa(isa_name):
        out, scale, zp = torch.ops.bnbx.fake_quantize(x, 4099, 8, symmetric, full, "none", 2.0)
    ref_out, ref_scale, ref_zp = fake_quantize_ref(x, 4099, 8, symmetric, full)
    assert_same(out, ref_out)
    assert_same(scale, ref_scale)
    assert torch.equal(zp, ref_zp)


@pytest.mark.parametrize("granularity", ["channel", "token"])
def test_zero_range_rows_give_no_nan(granularity):
    w = torch.randn(8, 16)
    w[2] = 0.0
    w[:, 5] = 0.0
    for symmetric in (True, False):
        out = fake_quantize(w, 4, symmetric, granularity, range="full")
        assert torch.isfinite(out).all()
        assert torch.equal(out[2], torch.zeros(16))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_split_groups_per_tensor(threads):
    # one group larger than a segment (2^16 elements): ranges per segment, then values
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.randn(3 * 65536 + 11)
        x[70000] = 40.0
        for dtype in DTYPES:
            xx = x.to(dtype)
            out, scale, _ = torch.ops.bnbx.fake_quantize(xx, xx.numel(), 8, False, True, "none", 2.0)
            ref_out, ref_scale, _ = fake_quantize_ref(xx, xx.numel(), 8, False, True)
            assert_same(out, ref_out)
            assert_same(scale, ref_scale)
    finally:
        torch.set_num_threads(previous)


# --- exactness against the deployable formats ------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("granularity", ["tensor", "channel", "token", "group"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int8_fake_equals_real(device, dtype, granularity, symmetric):
    for shape in [(13, 40), (4, 3, 20), (1, 80)]:
        x = (torch.randn(shape) * 3).to(dtype).to(device)
        kwargs = dict(granularity=granularity, axis=1 if len(shape) == 3 else 0, group_size=10)
        fake = fake_quantize(x, 8, symmetric, range="restricted" if symmetric else "full", **kwargs)
        q, state = bnbx.quantize_int8(x, symmetric=symmetric, **kwargs)
        real = bnbx.dequantize_int8(q, state)
        assert fake.dtype == real.dtype == dtype
        assert torch.equal(fake, real)
        _, scale, zp = fake_quantize(
            x, 8, symmetric, range="restricted" if symmetric else "full", return_params=True, **kwargs
        )
        assert torch.equal(scale, state.scale) and torch.equal(zp, state.zero_point)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("symmetric", [True, False])
def test_equals_torch_fake_quantize(bits, full, symmetric):
    qmin, qmax = (int(v) for v in grid(bits, full))
    w = torch.randn(24, 50) * torch.rand(24, 1) * 4
    fake, scale, zp = fake_quantize(
        w, bits, symmetric, "channel", range="full" if full else "restricted", return_params=True
    )
    expected = torch.fake_quantize_per_channel_affine(w, scale, zp, 0, qmin, qmax)
    assert torch.equal(fake, expected)
    fake_t, scale_t, zp_t = fake_quantize(
        w, bits, symmetric, "tensor", range="full" if full else "restricted", return_params=True
    )
    assert torch.equal(fake_t, torch.fake_quantize_per_tensor_affine(w, float(scale_t), int(zp_t), qmin, qmax))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [64, 128])
def test_4bit_fake_equals_real(dtype, quant_type, blocksize):
    x = torch.randn(7, 96, dtype=dtype, requires_grad=True)
    fake = fake_quantize_4bit(x, quant_type, blocksize)
    packed, state = bnbx.quantize_4bit(x.detach(), blocksize=blocksize, quant_type=quant_type)
    assert torch.equal(fake, bnbx.dequantize_4bit(packed, state))
    grad = torch.randn_like(fake)
    fake.backward(grad)
    assert torch.equal(x.grad, grad)  # straight-through


# --- gradients ------------------------------------------------------------------------------------------------
# A straight-through estimator is not the derivative of the (piecewise constant) forward, so finite differences
# (gradcheck) cannot judge it; the gradients are compared with plain-torch autograd of the surrogate instead.


def test_ste_gradients():
    x = (torch.randn(6, 33) * 2).requires_grad_()
    grad = torch.randn(6, 33)
    fake_quantize(x, 4, True, "token").backward(grad)
    assert torch.equal(x.grad, grad)
    x.grad = None
    fake_quantize(x, 4, True, "token", mask="absolute", clip=1.5).backward(grad)
    assert torch.equal(x.grad, grad * (x.detach().abs() < 1.5))
    x.grad = None
    # full range: +absmax maps to qmax + 0.5, rounds to qmax + 1 and is clamped: no gradient there
    fake_quantize(x, 4, True, "token", range="full", mask="range").backward(grad)
    _, scale, _ = fake_quantize(x.detach(), 4, True, "token", range="full", return_params=True)
    code = torch.round(x.detach() * (1.0 / scale[:, None]))
    assert torch.equal(x.grad, grad * ((code >= -8) & (code <= 7)))
    assert (x.grad == 0).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lsq_gradients_match_reference(dtype):
    x = torch.randn(5, 40, dtype=torch.float32) * 2
    scale = lsq_init_scale(x, 4, "channel", "mean").requires_grad_()
    offset = torch.zeros(5, 1).requires_grad_()
    g = 0.37
    out = fake_quantize_lsq(x.requires_grad_(), scale, offset, bits=4, grad_scale=g)
    upstream = torch.randn_like(out)
    out.backward(upstream)
    xr, sr, orf = (
        x.detach().clone().requires_grad_(),
        scale.detach().clone().requires_grad_(),
        offset.detach().clone().requires_grad_(),
    )
    ref = lsq_ref(xr, sr, orf, -7.0, 7.0, g)
    ref.backward(upstream)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(scale.grad, sr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(offset.grad, orf.grad, rtol=1e-5, atol=1e-5)


def test_lsq_init():
    w = torch.randn(4, 30)
    assert torch.equal(lsq_init_scale(w, 4, "channel", "minmax").view(-1), w.abs().amax(1) / 7)
    torch.testing.assert_close(lsq_init_scale(w, 4, "tensor", "mean"), (2 * w.abs().mean() / 7**0.5).view(1))
    # LSQ with the MinMax scale is RTN: the same values as the fused kernel
    s = lsq_init_scale(w, 4, "channel", "minmax")
    assert torch.equal(fake_quantize_lsq(w, s, bits=4), fake_quantize(w, 4, True, "channel"))


# --- opcheck ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype,mask", [(torch.float32, "none"), (torch.bfloat16, "range"), (torch.float16, "absolute")]
)
def test_opcheck_fake_quantize(dtype, mask):
    x = torch.randn(6, 20, dtype=dtype, requires_grad=True)
    torch.library.opcheck(torch.ops.bnbx.fake_quantize.default, (x, 7, 4, False, True, mask, 1.0))


def test_opcheck_lsq_and_4bit():
    x = torch.randn(4, 64, requires_grad=True)
    s = torch.full((4, 1), 0.2, requires_grad=True)
    o = torch.zeros((4, 1), requires_grad=True)
    torch.library.opcheck(torch.ops.bnbx.fake_quantize_lsq.default, (x, s, o, -7.0, 7.0, 0.1))
    torch.library.opcheck(torch.ops.bnbx.fake_quantize_4bit.default, (x, 64, "nf4"))


def test_compile_fullgraph():
    fn = torch.compile(lambda t: fake_quantize(t, 4, True, "token") * 2, fullgraph=True, backend="eager")
    x = torch.randn(3, 16)
    assert torch.equal(fn(x), fake_quantize(x, 4, True, "token") * 2)


# --- bad input ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 9, 0, 16])
def test_bits_out_of_range(bits):
    with pytest.raises(ValueError, match="bits must be from 2 to 8"):
        fake_quantize(torch.randn(4), bits)
    with pytest.raises(ValueError, match="bits must be from 2 to 8"):
        torch.ops.bnbx.fake_quantize(torch.randn(4), 4, bits, True, False, "none", 2.0)


def test_bad_arguments():
    x = torch.randn(4, 10)
    with pytest.raises(ValueError, match="group_size 3 does not divide the last dimension"):
        fake_quantize(x, 4, granularity="group", group_size=3)
    with pytest.raises(ValueError, match="granularity must be"):
        fake_quantize(x, 4, granularity="row")
    with pytest.raises(ValueError, match="range must be"):
        fake_quantize(x, 4, range="wide")
    with pytest.raises(ValueError, match="axis 2 is out of range"):
        fake_quantize(x, 4, granularity="channel", axis=2)
    with pytest.raises(ValueError, match="mask must be"):
        torch.ops.bnbx.fake_quantize(x, 10, 4, True, False, "soft", 2.0)
    with pytest.raises(ValueError, match="group_size must be at least 1"):
        torch.ops.bnbx.fake_quantize(x, 0, 4, True, False, "none", 2.0)
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16"):
        torch.ops.bnbx.fake_quantize(x.double(), 10, 4, True, False, "none", 2.0)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        fake_quantize([1.0, 2.0])
    with pytest.raises(ValueError, match="must hold one value or one per row"):
        fake_quantize_lsq(x, torch.ones(3, 1))
    with pytest.raises(ValueError, match="quant_type must be"):
        fake_quantize_4bit(x, "int4")
