"""LLM.int8() ops: references bit for bit on every instruction set and GEMM route, bitsandbytes parity,
bad input, opcheck, torch.compile and the autograd path."""

from __future__ import annotations


import pytest
import torch
from conftest import DTYPES, cpu_isa, dtype_id, gemm_route
from reference_int8_matmul import (
    int8_linear_matmul_ref,
    int8_mixed_linear_ref,
    int8_mm_dequant_ref,
    int8_vectorwise_dequant_ref,
    int8_vectorwise_quant_ref,
)

from bnbx import _library
from bnbx import functional as F

ops = torch.ops.bnbx

ISAS = [isa for isa in ("scalar", "avx2", "avx512") if isa != "avx512" or _library.cpu_capability() == "avx512"]
if _library.cpu_capability() == "scalar":
    ISAS = ["scalar"]
ROUTES = ["auto", "amx", "avx512_vnni", "base"]


def with_outliers(shape, dtype, cols=(3,), value=20.0):
    A = torch.randn(shape, dtype=torch.float32)
    for c in cols:
        if c < shape[-1]:
            A[..., c] *= value
    return A.to(dtype)


# ---- quantize / dequantize -------------------------------------------------------------------------------------


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", [(1, 1), (3, 17), (5, 63), (2, 3, 130), (4, 0), (0, 9), (7,)])
@pytest.mark.parametrize("threshold", [0.0, 6.0, 2.5])
def test_vectorwise_quant_matches_reference(isa, dtype, shape, threshold):
    A = with_outliers(shape, dtype, cols=(1, 4))
    with cpu_isa(isa):
        q, stats, cols = ops.int8_vectorwise_quant(A, threshold)
        back = ops.int8_vectorwise_dequant(q, stats)
    q_ref, stats_ref, cols_ref = int8_vectorwise_quant_ref(A, threshold)
    assert torch.equal(q, q_ref)
    assert torch.equal(stats, stats_ref)
    assert torch.equal(cols, cols_ref)
    assert torch.equal(back, int8_vectorwise_dequant_ref(q, stats))


@pytest.mark.parametrize("isa", ISAS)
def test_vectorwise_quant_zero_nan_inf_rows(isa):
    A = torch.randn(4, 37)
    A[0] = 0
    A[1, 5] = float("nan")
    A[2, 7] = float("inf")
    with cpu_isa(isa):
        q, stats, _ = ops.int8_vectorwise_quant(A, 0.0)
        q6, stats6, cols6 = ops.int8_vectorwise_quant(A, 6.0)
    assert not stats[0] and not q[0].any()  # all-zero row: zeros, no NaN
    assert stats[1].isnan() and not q[1].any()  # documented: a NaN row quantizes to 0
    assert stats[2].isinf() and not q[2].any()
    assert torch.equal(q[3], int8_vectorwise_quant_ref(A[3:], 0.0)[0][0])
    assert cols6.tolist() == [7] and torch.isfinite(stats6[2]) and q6[2].any()  # Inf is an outlier at 6


def test_threshold_semantics():
    A = torch.tensor([[1.0, 7.0, -2.0], [3.0, 0.5, -6.0]])
    q, stats, cols = F.int8_vectorwise_quant(A, threshold=6.0)
    assert cols.tolist() == [1, 2]  # any |x| >= threshold in the column, 6.0 included
    assert stats.tolist() == [2.0, 3.0]  # outlier values do not count; others in outlier columns do
    assert q[:, 1:].eq(0).all() and q[:, 0].tolist() == [64, 127]
    assert F.int8_vectorwise_quant(A)[2] is None  # threshold 0: no decomposition (bitsandbytes returns None)
    assert F.int8_vectorwise_quant(A, threshold=100.0)[2].numel() == 0


# ---- GEMM --------------------------------------------------------------------------------------------------------

SIZES = [1, 3, 17, 63]


@pytest.mark.parametrize("route", ROUTES)
def test_gemm_exact_odd_shapes(route):
    with gemm_route(route):
        for M in SIZES:
            for N in SIZES:
                for K in SIZES + [4095]:
                    A = torch.randint(-128, 128, (M, K), dtype=torch.int8)
                    B = torch.randint(-128, 128, (N, K), dtype=torch.int8)
                    assert torch.equal(ops.int8_linear_matmul(A, B), int8_linear_matmul_ref(A, B)), (M, N, K)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("shape", [(300, 97, 200), (33, 65, 4095), (2, 1, 3, 64)])
def test_gemm_exact_routes_and_isas(isa, route, shape):
    *lead, N, K = shape
    A = torch.randint(-128, 128, (*lead, K), dtype=torch.int8)
    B = torch.randint(-128, 128, (N, K), dtype=torch.int8)
    with cpu_isa(isa), gemm_route(route):
        C = ops.int8_linear_matmul(A, B)
    assert torch.equal(C, int8_linear_matmul_ref(A, B))
    assert torch.equal(
        C.reshape(-1, N), torch._int_mm(A.reshape(-1, K), B.t()) if A.numel() // K > 16 else C.reshape(-1, N)
    )


def test_gemm_extremes_and_empty():
    for K in (64, 4096):
        A = torch.full((40, K), -128, dtype=torch.int8)
        B = torch.full((33, K), -128, dtype=torch.int8)
        assert ops.int8_linear_matmul(A, B).eq(128 * 128 * K).all()
    assert ops.int8_linear_matmul(torch.ones(0, 5, dtype=torch.int8), torch.ones(3, 5, dtype=torch.int8)).shape == (
        0,
        3,
    )
    assert ops.int8_linear_matmul(torch.ones(4, 0, dtype=torch.int8), torch.ones(3, 0, dtype=torch.int8)).eq(0).all()


# ---- epilogue and fused layer ------------------------------------------------------------------------------------


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("with_bias", [False, True])
def test_mm_dequant_matches_reference(isa, dtype, with_bias):
    C = torch.randint(-(2**24), 2**24, (5, 37), dtype=torch.int32)
    row, col = torch.rand(5) * 4, torch.rand(37) * 4
    bias = torch.randn(37, dtype=dtype) if with_bias else None
    with cpu_isa(isa):
        out = ops.int8_mm_dequant(C, row, col, dtype, bias)
    assert out.dtype == dtype
    assert torch.equal(out, int8_mm_dequant_ref(C, row, col, bias, dtype))
    assert ops.int8_mm_dequant(C, row, col).dtype == torch.float16  # bitsandbytes' default


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("shape", [(1, 64), (3, 5, 130), (70, 33)])
def test_mixed_linear_matches_reference(isa, dtype, threshold, shape):
    N, K = 29, shape[-1]
    A = with_outliers(shape, dtype, cols=(2, 9, 30))
    W = torch.randn(N, K)
    CB, SCB, _ = ops.int8_vectorwise_quant(W, 0.0)
    bias = torch.randn(N, dtype=dtype)
    with cpu_isa(isa):
        out = ops.int8_mixed_linear(A, CB, SCB, bias, threshold)
    assert out.dtype == dtype and out.shape == (*shape[:-1], N)
    assert torch.equal(out, int8_mixed_linear_ref(A, CB, SCB, bias, threshold))


def test_mixed_linear_many_outlier_columns():
    # more than 32 outlier columns: one fp32 GEMM adds them instead of the epilogue (other rounding order)
    A = with_outliers((9, 100), torch.float32, cols=range(0, 100, 2))
    CB, SCB, _ = ops.int8_vectorwise_quant(torch.randn(21, 100), 0.0)
    out = ops.int8_mixed_linear(A, CB, SCB, None, 6.0)
    torch.testing.assert_close(out, int8_mixed_linear_ref(A, CB, SCB, None, 6.0), rtol=1e-5, atol=1e-4)


# ---- bitsandbytes parity -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("threshold", [0.0, 6.0, 6.1])
def test_matches_bitsandbytes(dtype, threshold):
    bnb = pytest.importorskip("bitsandbytes")
    A = with_outliers((33, 257), dtype, cols=(5, 100))
    q, stats, cols = F.int8_vectorwise_quant(A, threshold)
    q2, stats2, cols2 = bnb.functional.int8_vectorwise_quant(A.clone(), threshold)
    assert torch.equal(q, q2) and torch.equal(stats, stats2)
    assert (cols is None and cols2 is None) or torch.equal(cols, cols2)
    assert torch.equal(F.int8_vectorwise_dequant(q, stats), bnb.functional.int8_vectorwise_dequant(q, stats))
    CB, SCB, _ = F.int8_vectorwise_quant(torch.randn(47, 257, dtype=dtype))
    C = F.int8_linear_matmul(q, CB)
    assert torch.equal(C, bnb.functional.int8_linear_matmul(q, CB))
    bias = torch.randn(47, dtype=torch.float16)
    assert torch.equal(
        F.int8_mm_dequant(C, stats, SCB, bias=bias), bnb.functional.int8_mm_dequant(C, stats, SCB, bias=bias)
    )


# ---- bad input -----------------------------------------------------------------------------------------------------

I8 = torch.ones(4, 8, dtype=torch.int8)
BAD = [
    (
        lambda d: ops.int8_vectorwise_quant(torch.ones(4, 8, dtype=torch.float64, device=d), 0.0),
        TypeError,
        "int8_vectorwise_quant: A must be float32, float16 or bfloat16, got float64",
    ),
    (
        lambda d: ops.int8_vectorwise_quant(torch.tensor(1.0, device=d), 0.0),
        ValueError,
        "A must have at least one dimension",
    ),
    (
        lambda d: ops.int8_vectorwise_quant(torch.ones(4, 8, device=d), -1.0),
        ValueError,
        "int8_vectorwise_quant: threshold must be >= 0",
    ),
    (
        lambda d: ops.int8_vectorwise_quant(torch.ones(4, 8, device=d), float("nan")),
        ValueError,
        "threshold must be >= 0",
    ),
    (
        lambda d: ops.int8_vectorwise_dequant(I8.to(d), torch.ones(3, device=d)),
        ValueError,
        "int8_vectorwise_dequant: stats must hold 4 values, got 3",
    ),
    (
        lambda d: ops.int8_vectorwise_dequant(I8.float().to(d), torch.ones(4, device=d)),
        TypeError,
        "int8_vectorwise_dequant: A must be int8, got float32",
    ),
    (
        lambda d: ops.int8_linear_matmul(I8.float().to(d), I8.to(d)),
        TypeError,
        "int8_linear_matmul: A must be int8, got float32",
    ),
    (
        lambda d: ops.int8_linear_matmul(I8.to(d), I8.to(torch.uint8).to(d)),
        TypeError,
        "int8_linear_matmul: B must be int8, got uint8",
    ),
    (
        lambda d: ops.int8_linear_matmul(I8.to(d), torch.ones(3, 9, dtype=torch.int8, device=d)),
        ValueError,
        "int8_linear_matmul: B must be [N, K] with K = A.shape[-1] = 8",
    ),
    (
        lambda d: ops.int8_linear_matmul(I8.to(d), torch.ones(2, 3, 8, dtype=torch.int8, device=d)),
        ValueError,
        "int8_linear_matmul: B must be 2-D [N, K], got 3 dimensions",
    ),
    # the weight passed transposed ([K, N] instead of [N, K])
    (
        lambda d: ops.int8_linear_matmul(I8.to(d), torch.ones(8, 3, dtype=torch.int8, device=d)),
        ValueError,
        "K = A.shape[-1] = 8, got [8, 3]",
    ),
    (
        lambda d: ops.int8_linear_matmul(
            torch.ones(1, 2**17, dtype=torch.int8, device=d), torch.ones(1, 2**17, dtype=torch.int8, device=d)
        ),
        ValueError,
        "K must be at most 131071",
    ),
    (
        lambda d: ops.int8_mm_dequant(I8.to(d), torch.ones(4, device=d), torch.ones(8, device=d)),
        TypeError,
        "int8_mm_dequant: A must be int32, got int8",
    ),
    (
        lambda d: ops.int8_mm_dequant(I8.int().to(d), torch.ones(4, device=d), torch.ones(7, device=d)),
        ValueError,
        "int8_mm_dequant: col_stats must hold 8 values, got 7",
    ),
    (
        lambda d: ops.int8_mm_dequant(
            I8.int().to(d), torch.ones(4, device=d, dtype=torch.float16), torch.ones(8, device=d)
        ),
        TypeError,
        "int8_mm_dequant: row_stats must be float32, got float16",
    ),
    (
        lambda d: ops.int8_mm_dequant(I8.int().to(d), torch.ones(4, device=d), torch.ones(8, device=d), torch.int32),
        TypeError,
        "int8_mm_dequant: dtype must be float32, float16 or bfloat16, got int32",
    ),
    (
        lambda d: ops.int8_mm_dequant(
            I8.int().to(d), torch.ones(4, device=d), torch.ones(8, device=d), None, torch.ones(5, device=d)
        ),
        ValueError,
        "int8_mm_dequant: bias must hold N = 8 values, got 5",
    ),
    (
        lambda d: ops.int8_mixed_linear(torch.ones(4, 8, device=d), I8.to(d), torch.ones(3, device=d), None, 0.0),
        ValueError,
        "int8_mixed_linear: SCB must hold 4 values, got 3",
    ),
    (
        lambda d: ops.int8_mixed_linear(torch.ones(4, 7, device=d), I8.to(d), torch.ones(4, device=d), None, 0.0),
        ValueError,
        "int8_mixed_linear: CB must be [N, K] with K = A.shape[-1] = 7",
    ),
    (
        lambda d: ops.int8_mixed_linear(torch.ones(4, 8, device=d), I8.to(d), torch.ones(4, device=d), None, -0.5),
        ValueError,
        "int8_mixed_linear: threshold must be >= 0",
    ),
    (
        lambda d: ops.int8_mixed_linear(
            torch.ones(4, 8, device=d, dtype=torch.int8), I8.to(d), torch.ones(4, device=d), None, 0.0
        ),
        TypeError,
        "int8_mixed_linear: A must be float32, float16 or bfloat16",
    ),
]


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("index", range(len(BAD)))
def test_bad_input(device, index):
    call, error, words = BAD[index]
    with pytest.raises(
        error, match=words.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(").replace(")", r"\)")
    ):
        call(device)


def test_python_wrappers_check_arguments():
    with pytest.raises(TypeError, match="int8_vectorwise_quant: A must be a torch.Tensor"):
        F.int8_vectorwise_quant([1.0, 2.0])
    with pytest.raises(ValueError, match="threshold must be >= 0"):
        F.int8_vectorwise_quant(torch.ones(2, 2), threshold=float("nan"))
    with pytest.raises(ValueError, match="dtype must be torch.int32"):
        F.int8_linear_matmul(I8, I8, dtype=torch.float32)


# ---- opcheck, compile, autograd ------------------------------------------------------------------------------------


def opcheck_samples(dtype):
    A = with_outliers((6, 70), dtype, cols=(3, 40))
    W = torch.randn(19, 70, dtype=dtype)
    CB, SCB, _ = ops.int8_vectorwise_quant(W, 0.0)
    q, stats, _ = ops.int8_vectorwise_quant(A, 0.0)
    C = ops.int8_linear_matmul(q, CB)
    bias = torch.randn(19, dtype=dtype)
    yield ops.int8_vectorwise_quant.default, (A, 0.0)
    yield ops.int8_vectorwise_quant.default, (A, 6.0)
    yield ops.int8_vectorwise_dequant.default, (q, stats)
    yield ops.int8_linear_matmul.default, (q, CB)
    yield ops.int8_mm_dequant.default, (C, stats, SCB, dtype, bias)
    yield ops.int8_mixed_linear.default, (A, CB, SCB, bias, 6.0)
    yield ops.int8_mixed_linear.default, (A.reshape(2, 3, 70).requires_grad_(), CB, SCB, bias.requires_grad_(), 0.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_opcheck(dtype):
    for op, args in opcheck_samples(dtype):
        torch.library.opcheck(op, args)


def test_compile_fullgraph_with_outliers():
    def quant_dequant(A):
        q, stats, cols = ops.int8_vectorwise_quant(A, 6.0)
        return ops.int8_vectorwise_dequant(q, stats), cols.numel()

    A = with_outliers((8, 64), torch.float16, cols=(5, 7))
    compiled = torch.compile(quant_dequant, fullgraph=True, backend="aot_eager")
    out, n = compiled(A)
    ref, n_ref = quant_dequant(A)
    assert torch.equal(out, ref) and n == n_ref == 2


def test_autograd_matches_fp64_reference():
    A = with_outliers((2, 5, 48), torch.float32, cols=(4,)).requires_grad_()
    CB, SCB, _ = ops.int8_vectorwise_quant(torch.randn(13, 48), 0.0)
    bias = torch.randn(13, requires_grad=True)
    out = F.int8_mixed_linear(A, CB, SCB, bias, 6.0)
    grad = torch.randn_like(out)
    out.backward(grad)
    # the backward of y = A @ W^T + b with W = dequant(CB, SCB), in fp64
    W64 = int8_vectorwise_dequant_ref(CB, SCB).double()
    A64 = A.detach().double().requires_grad_()
    b64 = bias.detach().double().requires_grad_()
    torch.nn.functional.linear(A64, W64, b64).backward(grad.double())
    torch.testing.assert_close(A.grad.double(), A64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bias.grad.double(), b64.grad, rtol=1e-6, atol=1e-6)
    # the backward formula itself is linear: gradcheck it in fp64 through the same dequantized weight
    assert torch.autograd.gradcheck(lambda a, b: torch.nn.functional.linear(a, W64, b), (A64, b64))


def test_functional_signatures_match_bitsandbytes():
    bnb = pytest.importorskip("bitsandbytes")
    import inspect

    def params(fn):
        return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]

    for name in ("int8_vectorwise_quant", "int8_vectorwise_dequant", "int8_linear_matmul", "int8_mm_dequant"):
        ours, theirs = params(getattr(F, name)), params(getattr(bnb.functional, name))
        # int8_mm_dequant adds one trailing keyword, dtype (bitsandbytes always returns fp16)
        assert ours[: len(theirs)] == theirs and len(ours) - len(theirs) == (name == "int8_mm_dequant")
