"""LLM.int8() fused paths: the epilogue run on each AMX accumulator tile (no int32 [M, N] in between), the
pre-packed AMX weight (int8_pack_weight, int8_mixed_linear_packed) and its cache in Linear8bitLt. Each is held
bit for bit to the plain-torch reference and to the unfused route, over odd shapes and fp32/fp16/bf16."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import DTYPES, dtype_id, gemm_route
from reference_int8_matmul import int8_linear_matmul_ref, int8_mixed_linear_ref

from bnbx import _library
from bnbx import functional as F
from bnbx.functional_int8 import int8_gemm_route
from bnbx.matmul_int8 import matmul_8bit
from bnbx.nn import Linear8bitLt

ops = torch.ops.bnbx

AVX512 = _library.cpu_capability() == "avx512"
needs_avx512 = pytest.mark.skipif(not AVX512, reason="the AMX weight layout is packed by the AVX-512 kernels")


def layer_inputs(M: int, N: int, K: int, dtype: torch.dtype, outlier_cols=(), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(M, K, generator=g)
    for c in outlier_cols:
        if c < K:
            A[:, c] *= 25.0
    CB, SCB, _ = ops.int8_vectorwise_quant(torch.randn(N, K, generator=g), 0.0)
    bias = torch.randn(N, generator=g).to(dtype)
    return A.to(dtype), CB, SCB, bias


def pack_ref(CB: torch.Tensor) -> torch.Tensor:
    """AMX tile layout: 16-row blocks b, 64-byte k chunks c; tile row r holds, for rows i = 0..15 of the block,
    the 4 bytes CB[16b + i, 64c + 4r : 64c + 4r + 4]; zeros past N and K."""
    N, K = CB.shape
    Np, Kp = -(-N // 16) * 16, -(-K // 64) * 64
    X = torch.zeros(Np, Kp, dtype=torch.int8)
    X[:N, :K] = CB
    tiles = X.reshape(Np // 16, 16, Kp // 64, 16, 4)  # b, i, c, r, j
    return tiles.permute(0, 2, 3, 1, 4).contiguous().view(torch.uint8).reshape(-1)


# ---- fused epilogue == unfused route == reference -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fused_epilogue_bit_identical(dtype, threshold, with_bias):
    shapes = [(M, N, K) for M in (1, 3, 17, 33, 63) for N in (1, 3, 17, 63) for K in (1, 3, 17, 63)]
    shapes += [(1, 17, 4095), (33, 3, 4095), (63, 63, 4095), (70, 45, 130), (300, 45, 130)]  # 300: two row passes
    for M, N, K in shapes:
        A, CB, SCB, bias = layer_inputs(M, N, K, dtype, outlier_cols=(0, 2, 40), seed=M * 10007 + N * 101 + K)
        b = bias if with_bias else None
        with gemm_route("amx"):  # fused on AMX CPUs (also below 32 rows), else the plain kernel
            fused = ops.int8_mixed_linear(A, CB, SCB, b, threshold)
        with gemm_route("base"):  # int32 product written, then int8_mm_dequant's kernel
            unfused = ops.int8_mixed_linear(A, CB, SCB, b, threshold)
        ref = int8_mixed_linear_ref(A, CB, SCB, b, threshold)
        assert fused.dtype == dtype and fused.shape == (M, N)
        assert torch.equal(fused, ref), (M, N, K)
        assert torch.equal(unfused, ref), (M, N, K)


def test_fused_epilogue_leading_dims_and_empty():
    A, CB, SCB, bias = layer_inputs(2 * 3 * 11, 37, 200, torch.bfloat16, outlier_cols=(7,))
    A = A.reshape(2, 3, 11, 200)
    with gemm_route("amx"):
        out = ops.int8_mixed_linear(A, CB, SCB, bias, 6.0)
        assert torch.equal(out, int8_mixed_linear_ref(A, CB, SCB, bias, 6.0))
        assert ops.int8_mixed_linear(A[:0], CB, SCB, bias, 6.0).shape == (0, 3, 11, 37)
        empty_k = ops.int8_mixed_linear(torch.ones(40, 0), CB[:, :0], SCB, None, 0.0)
        assert empty_k.shape == (40, 37) and empty_k.eq(0).all()


def test_fused_epilogue_many_outlier_columns():
    # more than 32 outlier columns: the fused epilogue writes fp32 and one fp32 GEMM adds them
    A, CB, SCB, bias = layer_inputs(40, 21, 100, torch.float32, outlier_cols=range(0, 100, 2))
    with gemm_route("amx"):
        fused = ops.int8_mixed_linear(A, CB, SCB, bias, 6.0)
    with gemm_route("base"):
        unfused = ops.int8_mixed_linear(A, CB, SCB, bias, 6.0)
    assert torch.equal(fused, unfused)
    torch.testing.assert_close(fused, int8_mixed_linear_ref(A, CB, SCB, bias, 6.0), rtol=1e-5, atol=1e-4)


def test_fused_epilogue_zero_and_nan_rows():
    A, CB, SCB, bias = layer_inputs(40, 19, 64, torch.float16)
    A[3] = 0.0
    A[5, 7] = float("nan")
    with gemm_route("amx"):
        out = ops.int8_mixed_linear(A, CB, SCB, bias, 0.0)
    assert torch.equal(out[3], bias)  # a zero row gives the bias alone
    ref = int8_mixed_linear_ref(A, CB, SCB, bias, 0.0)
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.nan_to_num(), ref.nan_to_num())


@pytest.mark.parametrize("route", ["amx", "base"])
def test_gemm_exact_rows_aliasing_stride(route):
    # K a multiple of 256: the AMX route copies A to rows one cache line further apart first
    for M in (1, 3, 17, 33, 63):
        for N in (1, 17, 63):
            for K in (256, 768):
                A = torch.randint(-128, 128, (M, K), dtype=torch.int8)
                B = torch.randint(-128, 128, (N, K), dtype=torch.int8)
                with gemm_route(route):
                    assert torch.equal(ops.int8_linear_matmul(A, B), int8_linear_matmul_ref(A, B)), (M, N, K)


# ---- pre-packed weight ---------------------------------------------------------------------------------------------


@needs_avx512
@pytest.mark.parametrize("shape", [(1, 1), (3, 17), (17, 63), (16, 64), (33, 130), (63, 4095)])
def test_pack_weight_layout(shape):
    CB = torch.randint(-128, 128, shape, dtype=torch.int8)
    packed = F.int8_pack_weight(CB)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert torch.equal(packed, pack_ref(CB))


@needs_avx512
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("route", ["auto", "amx", "base"])
def test_mixed_linear_packed_matches_reference(dtype, route):
    for M, N, K in [(1, 3, 17), (17, 63, 63), (33, 17, 4095), (64, 32, 128), (100, 45, 130)]:
        A, CB, SCB, bias = layer_inputs(M, N, K, dtype, outlier_cols=(1, 9), seed=M + N + K)
        packed = ops.int8_pack_weight(CB)
        for b in (None, bias):
            for threshold in (0.0, 6.0):
                with gemm_route(route):
                    out = ops.int8_mixed_linear_packed(A, CB, packed, SCB, b, threshold)
                assert torch.equal(out, int8_mixed_linear_ref(A, CB, SCB, b, threshold)), (M, N, K)


@needs_avx512
def test_mixed_linear_packed_bad_input():
    A, CB, SCB, bias = layer_inputs(40, 17, 70, torch.float32)
    packed = ops.int8_pack_weight(CB)
    with pytest.raises(ValueError, match=r"int8_mixed_linear_packed: packed_CB must hold int8_pack_weight\(CB\)'s"):
        ops.int8_mixed_linear_packed(A, CB, packed[:-1], SCB, bias, 0.0)
    with pytest.raises(TypeError, match="int8_mixed_linear_packed: packed_CB must be uint8"):
        ops.int8_mixed_linear_packed(A, CB, packed.view(torch.int8), SCB, bias, 0.0)
    with pytest.raises(ValueError, match="int8_mixed_linear_packed: CB must be"):
        ops.int8_mixed_linear_packed(A[:, :69], CB, packed, SCB, bias, 0.0)
    with pytest.raises(TypeError, match="int8_pack_weight: CB must be int8"):
        ops.int8_pack_weight(CB.float())
    with pytest.raises(ValueError, match="int8_pack_weight: CB must be 2-D"):
        ops.int8_pack_weight(CB[0])
    with pytest.raises(TypeError, match="int8_pack_weight: CB must be a torch.Tensor"):
        F.int8_pack_weight([1, 2])
    with pytest.raises(ValueError, match="packed_CB is only for an int8 weight"):
        matmul_8bit(A, torch.randn(17, 70), None, None, 0.0, packed)


@needs_avx512
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_opcheck_packed(dtype):
    A, CB, SCB, bias = layer_inputs(40, 19, 70, dtype, outlier_cols=(3,))
    packed = ops.int8_pack_weight(CB)
    torch.library.opcheck(ops.int8_pack_weight.default, (CB,))
    torch.library.opcheck(ops.int8_mixed_linear_packed.default, (A, CB, packed, SCB, bias, 6.0))
    torch.library.opcheck(
        ops.int8_mixed_linear_packed.default,
        (A.reshape(4, 10, 70).requires_grad_(), CB, packed, SCB, bias.requires_grad_(), 0.0),
    )


@needs_avx512
def test_packed_autograd_matches_unpacked():
    A, CB, SCB, bias = layer_inputs(40, 13, 48, torch.float32, outlier_cols=(4,))
    packed = ops.int8_pack_weight(CB)
    A1, b1 = A.clone().requires_grad_(), bias.clone().requires_grad_()
    A2, b2 = A.clone().requires_grad_(), bias.clone().requires_grad_()
    out1 = matmul_8bit(A1, CB, SCB, b1, 6.0, packed)
    out2 = matmul_8bit(A2, CB, SCB, b2, 6.0)
    assert torch.equal(out1, out2)
    grad = torch.randn_like(out1)
    out1.backward(grad)
    out2.backward(grad)
    assert torch.equal(A1.grad, A2.grad) and torch.equal(b1.grad, b2.grad)


# ---- the cached packed weight in Linear8bitLt ----------------------------------------------------------------------


def make_layer(N=45, K=130, threshold=6.0, prepack=True):
    torch.manual_seed(0)
    layer = Linear8bitLt.from_linear(torch.nn.Linear(K, N), threshold=threshold).eval()
    assert layer.prepack_weight is False  # opt-in: it costs N x K bytes
    layer.prepack_weight = prepack
    return layer


amx_only = pytest.mark.skipif(int8_gemm_route() != "amx", reason="the layer caches the packed weight on AMX CPUs")


@amx_only
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_layer_caches_packed_weight(dtype):
    layer = make_layer()
    x = torch.randn(2, 20, 130).to(dtype)
    ref = int8_mixed_linear_ref(x, layer.weight.data, layer.weight.SCB, layer.bias.to(dtype), 6.0)
    assert torch.equal(layer(x[:, :1]), ref[:, :1])  # 2 rows: no packed copy kept
    assert layer._packed is None
    out = layer(x)
    assert torch.equal(out, ref)
    first = layer._packed[3]
    assert torch.equal(first, pack_ref(layer.weight.data))
    assert torch.equal(layer(x), ref) and layer._packed[3] is first  # reused
    layer.prepack_weight = False
    assert torch.equal(layer(x), ref)
    plain = make_layer(prepack=False)  # the default keeps no copy
    assert torch.equal(plain(x), ref) and plain._packed is None
    assert set(layer.state_dict()) == {"weight", "bias", "SCB", "weight_format"}


@amx_only
def test_layer_packed_weight_follows_weight_changes():
    layer = make_layer()
    x = torch.randn(40, 130)
    layer(x)
    first = layer._packed[3]
    # in place through the parameter: its version counter moves
    with torch.no_grad():
        layer.weight.copy_(torch.randint(-127, 128, layer.weight.shape, dtype=torch.int8))
    out = layer(x)
    assert layer._packed[3] is not first
    assert torch.equal(out, int8_mixed_linear_ref(x, layer.weight.data, layer.weight.SCB, layer.bias, 6.0))
    # a new checkpoint replaces the parameter
    other = make_layer()
    with torch.no_grad():
        other.weight.copy_(torch.randint(-127, 128, other.weight.shape, dtype=torch.int8))
    layer.load_state_dict(other.state_dict())
    assert torch.equal(layer(x), other(x))
    # writes into .data bypass the version counter: drop_packed_weight rebuilds the copy
    layer.weight.data.copy_(torch.randint(-127, 128, layer.weight.shape, dtype=torch.int8))
    layer.drop_packed_weight()
    assert torch.equal(layer(x), int8_mixed_linear_ref(x, layer.weight.data, layer.weight.SCB, layer.bias, 6.0))


@amx_only
def test_layer_packed_weight_not_deep_copied():
    layer = make_layer()
    x = torch.randn(40, 130)
    out = layer(x)
    assert layer._packed is not None
    clone = copy.deepcopy(layer)
    assert clone._packed is None and torch.equal(clone(x), out)
    assert "_packed" in layer.__getstate__() and layer.__getstate__()["_packed"] is None  # nor pickled


def test_layer_compile_fullgraph_skips_cache():
    layer = make_layer(threshold=0.0)
    x = torch.randn(40, 130, dtype=torch.bfloat16)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), layer(x))
