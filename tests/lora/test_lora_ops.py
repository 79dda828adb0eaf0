"""bnbx::lora_forward / lora_backward, the fused products of a LoRA adapter, against the float64 reference on
every instruction set: odd sizes and ranks (SIMD blocks and tails), leading dimensions, empty tensors, every mix of
16- and 32-bit activations and adapters; gradients, gradcheck, thread counts, NaN, non-contiguous inputs."""

from __future__ import annotations

import pytest
import torch

from conftest import CUDA_READY, DTYPES, cpu_isa, dtype_id, isa_params
from reference_lora import assert_backward_within, assert_forward_within, lora_backward_ref

ops = torch.ops.bnbx
ISAS = ["scalar"] + isa_params("avx2", "avx512")
# (leading sizes, K, N, r): single rows, odd sizes around the 8- and 16-lane vectors and the 4-row blocks, ranks
# that fill no block, one block and several, and empty rows, features and outputs
SHAPES = [
    ((1,), 64, 128, 8),
    ((5,), 37, 29, 3),
    ((2, 3), 100, 70, 17),
    ((9,), 16, 65, 64),
    ((2,), 20, 33, 70),
    ((4,), 1, 1, 1),
    ((0,), 8, 6, 2),
    ((3,), 0, 5, 2),
    ((3,), 7, 0, 2),
    # more rows than the forward multiplies lora_B as stored (csrc/cpu/lora.cpp: kFewRows): B transposed
    ((20,), 33, 70, 5),
    ((3, 7), 130, 45, 16),
]


def inputs(lead, K, N, r, dtype, adapter_dtype, device="cpu"):
    x = torch.randn(*lead, K, dtype=dtype, device=device)
    base = torch.randn(*lead, N, dtype=dtype, device=device)
    lora_A = (torch.randn(r, K, device=device) / max(K, 1) ** 0.5).to(adapter_dtype)
    lora_B = torch.randn(N, r, device=device).to(adapter_dtype)
    return x, base, lora_A, lora_B


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("adapter_dtype", DTYPES, ids=dtype_id)
def test_forward_matches_reference(isa, dtype, adapter_dtype):
    for lead, K, N, r in SHAPES:
        x, base, A, B = inputs(lead, K, N, r, dtype, adapter_dtype)
        with cpu_isa(isa):
            out = ops.lora_forward(x, base, A, B, 2.5)
        assert_forward_within(out, x, base, A, B, 2.5)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_backward_matches_reference(isa, dtype, adapter_dtype):
    for lead, K, N, r in SHAPES:
        x, _, A, B = inputs(lead, K, N, r, dtype, adapter_dtype)
        grad = torch.randn(*lead, N, dtype=dtype)
        with cpu_isa(isa):
            grads = ops.lora_backward(grad, x, A, B, 0.5, True)
        assert_backward_within(grads, grad, x, A, B, 0.5)


def test_backward_without_the_input_gradient():
    x, _, A, B = inputs((6,), 40, 30, 4, torch.bfloat16, torch.float32)
    grad = torch.randn(6, 30, dtype=torch.bfloat16)
    grad_x, grad_A, grad_B = ops.lora_backward(grad, x, A, B, 2.0, False)
    assert grad_x.shape == (0,) and grad_x.dtype == torch.bfloat16
    _, full_A, full_B = ops.lora_backward(grad, x, A, B, 2.0, True)
    assert torch.equal(grad_A, full_A) and torch.equal(grad_B, full_B)


def test_autograd_gives_every_gradient():
    x, base, A, B = inputs((2, 5), 33, 19, 4, torch.float32, torch.float32)
    leaves = [t.clone().requires_grad_() for t in (x, base, A, B)]
    out = ops.lora_forward(*leaves, 1.5)
    grad = torch.randn_like(out)
    out.backward(grad)
    grad_x, grad_A, grad_B = lora_backward_ref(grad, x, A, B, 1.5)
    assert torch.equal(leaves[1].grad, grad)  # the base's gradient is the output's
    torch.testing.assert_close(leaves[0].grad.double(), grad_x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(leaves[2].grad.double(), grad_A, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(leaves[3].grad.double(), grad_B, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:Input #[0-9] requires gradient and is not a double")
@pytest.mark.parametrize("isa", ISAS)
def test_gradcheck(isa):
    # fp32 (the kernels take no float64): lora_forward is linear in each input, so a finite difference of 1e-2 is
    # exact but for fp32 rounding
    x, base, A, B = inputs((3,), 21, 18, 5, torch.float32, torch.float32)
    leaves = tuple(t.clone().requires_grad_() for t in (x, base, A, B))
    with cpu_isa(isa):
        assert torch.autograd.gradcheck(
            lambda *t: ops.lora_forward(*t, 0.75), leaves, eps=1e-2, atol=2e-3, rtol=2e-3
        )


@pytest.mark.parametrize("rows", [5, 130])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_results_do_not_depend_on_the_thread_count(threads, rows):
    x, base, A, B = inputs((rows,), 150, 333, 16, torch.bfloat16, torch.float32)
    grad = torch.randn(rows, 333, dtype=torch.bfloat16)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        expected = (ops.lora_forward(x, base, A, B, 2.0), *ops.lora_backward(grad, x, A, B, 2.0, True))
        torch.set_num_threads(threads)
        actual = (ops.lora_forward(x, base, A, B, 2.0), *ops.lora_backward(grad, x, A, B, 2.0, True))
    finally:
        torch.set_num_threads(previous)
    for a, e in zip(actual, expected):
        assert torch.equal(a, e)


def test_nan_stays_in_its_row():
    x, base, A, B = inputs((4,), 20, 10, 3, torch.bfloat16, torch.float32)
    x[1, 7] = float("nan")
    out = ops.lora_forward(x, base, A, B, 1.0)
    assert out[1].isnan().all() and not out[[0, 2, 3]].isnan().any()


def test_non_contiguous_inputs():
    x, base, A, B = inputs((6,), 24, 12, 4, torch.float16, torch.float32)
    x_t = x.t().contiguous().t()  # same values, column-major
    base_t = base.t().contiguous().t()
    B_t = B.t().contiguous().t()
    assert not x_t.is_contiguous()
    assert torch.equal(ops.lora_forward(x_t, base_t, A, B_t, 2.0), ops.lora_forward(x, base, A, B, 2.0))
    grad = torch.randn(6, 12, dtype=torch.float16)
    for a, e in zip(ops.lora_backward(grad.t().contiguous().t(), x_t, A, B_t, 2.0, True),
                    ops.lora_backward(grad, x, A, B, 2.0, True)):
        assert torch.equal(a, e)


def test_fp16_overflow_saturates_to_inf_as_a_rounding_does():
    x = torch.full((1, 4), 200.0, dtype=torch.float16)
    base = torch.full((1, 2), 60000.0, dtype=torch.float16)
    A, B = torch.ones(1, 4), torch.ones(2, 1)
    out = ops.lora_forward(x, base, A, B, 10.0)  # 60000 + 8000: past fp16's largest value
    assert torch.equal(out, (base.float() + 8000.0).half())
    assert out.isinf().all()


@pytest.mark.skipif(not CUDA_READY, reason="needs a CUDA GPU and a bnbx built with CUDA kernels")
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_cuda_matches_reference(dtype):
    for lead, K, N, r in SHAPES:
        x, base, A, B = inputs(lead, K, N, r, dtype, torch.float32, device="cuda")
        assert_forward_within(ops.lora_forward(x, base, A, B, 2.5), x, base, A, B, 2.5)
        grad = torch.randn(*lead, N, dtype=dtype, device="cuda")
        assert_backward_within(ops.lora_backward(grad, x, A, B, 0.5, True), grad, x, A, B, 0.5)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_the_cuda_implementation_on_cpu_tensors(dtype):
    # the CUDA slot (plain ATen products, compiled in every build) run on CPU tensors: the same sums
    cuda = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    for lead, K, N, r in SHAPES:
        x, base, A, B = inputs(lead, K, N, r, dtype, torch.bfloat16)
        assert_forward_within(ops.lora_forward.default.redispatch(cuda, x, base, A, B, 2.5), x, base, A, B, 2.5)
        grad = torch.randn(*lead, N, dtype=dtype)
        grads = ops.lora_backward.default.redispatch(cuda, grad, x, A, B, 0.5, True)
        assert_backward_within(grads, grad, x, A, B, 0.5)
        assert ops.lora_backward.default.redispatch(cuda, grad, x, A, B, 0.5, False)[0].shape == (0,)
