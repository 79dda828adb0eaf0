"""The cache of freed large CPU outputs (csrc/cpu/fresh_output.cpp): reuse, limits, and that every op whose output
can come from it writes that output in full (reused memory holds an earlier tensor's bytes)."""

from __future__ import annotations

import io
import multiprocessing
import os
import subprocess
import sys

import pytest
import torch

import bnbx
from bnbx import functional_int8 as F8

LIMIT = 256 << 20
SANITIZED = bnbx.cpu_cache_stats()["limit_bytes"] == 0 and os.environ.get("BNBX_CPU_CACHE_MB") is None
needs_cache = pytest.mark.skipif(SANITIZED, reason="the cache is off in sanitizer builds")


@pytest.fixture
def cache():
    """A cache with room for the tests' outputs, emptied before and after."""
    before = bnbx.cpu_cache_stats()["limit_bytes"]
    bnbx.set_cpu_cache_limit(LIMIT)
    bnbx.empty_cpu_cache()
    yield
    bnbx.set_cpu_cache_limit(before)
    bnbx.empty_cpu_cache()


def _largest(outputs) -> torch.Tensor:
    tensors = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    return max((t for t in tensors if isinstance(t, torch.Tensor)), key=lambda t: t.numel() * t.element_size())


def _poison(t: torch.Tensor) -> None:
    # 0xFF bytes: NaN as a float, -1 / 255 as an integer; any byte the op leaves unwritten shows up
    t.view(-1).view(torch.uint8).fill_(0xFF)


def _ops():
    g = torch.Generator().manual_seed(0)
    big = torch.randn(2048, 1537, generator=g)  # 12 MiB in fp32: cached; not a multiple of the blocksizes
    w = torch.randn(4096, 2305, generator=g) * 3  # 9.4 M codes: a cached uint8 / int8 output
    packed, state = bnbx.quantize_4bit(big, blocksize=64, quant_type="nf4")
    codes, absmax8 = torch.ops.bnbx.quantize_blockwise(w, bnbx.functional.create_dynamic_map(), 256)
    q8, scale8, zp8 = torch.ops.bnbx.quantize_int8(w, 128, False)
    CB, SCB, _ = F8.int8_vectorwise_quant(w)
    C = torch.randint(-(2**20), 2**20, (2048, 2100), dtype=torch.int32, generator=g)
    row_stats, col_stats = torch.rand(2048, generator=g) * 5, torch.rand(2100, generator=g) * 5
    lsq_scale = bnbx.qat.lsq_init_scale(big, 4, "channel", "minmax")
    grad = torch.randn_like(big)
    odd = torch.randn(4097, 4097, generator=g).to(torch.bfloat16)  # 8.4 MB packed, the last byte half-used
    w4, w4_state = bnbx.quantize_4bit(torch.randn(7000, 256, generator=g).to(torch.bfloat16), quant_type="nf4")
    a = torch.randn(640, 256, generator=g).to(torch.bfloat16)  # M above the fused kernels: tiles into at::mm
    lora_A, lora_B = torch.randn(16, 1537, generator=g), torch.randn(1537, 16, generator=g)
    return {
        "matmul_4bit": lambda: bnbx.matmul_4bit(a, w4.t(), w4_state),
        "quantize_4bit": lambda: torch.ops.bnbx.quantize_4bit(odd, 64, "nf4", torch.uint8),
        "dequantize_4bit": lambda: bnbx.dequantize_4bit(packed, state),
        "quantize_blockwise": lambda: torch.ops.bnbx.quantize_blockwise(w, bnbx.functional.create_dynamic_map(), 256),
        "dequantize_blockwise": lambda: torch.ops.bnbx.dequantize_blockwise(
            codes, absmax8, bnbx.functional.create_dynamic_map(), 256, torch.float32
        ),
        "quantize_int8": lambda: torch.ops.bnbx.quantize_int8(w, 128, False),
        "dequantize_int8": lambda: torch.ops.bnbx.dequantize_int8(q8, scale8, zp8, 128, torch.float16),
        "int8_vectorwise_quant": lambda: F8.int8_vectorwise_quant(w, threshold=6.0),
        "int8_vectorwise_dequant": lambda: F8.int8_vectorwise_dequant(CB, SCB),
        "int8_mm_dequant": lambda: F8.int8_mm_dequant(C, row_stats, col_stats),
        "fake_quantize": lambda: bnbx.qat.fake_quantize(big, bits=4, granularity="token", symmetric=False),
        "fake_quantize_lsq": lambda: torch.ops.bnbx.fake_quantize_lsq(big, lsq_scale, torch.zeros(()), -7.0, 7.0),
        "fake_quantize_lsq_backward": lambda: torch.ops.bnbx.fake_quantize_lsq_backward(
            grad, big, lsq_scale, torch.zeros(()), -7.0, 7.0, 0.01
        ),
        "lora_forward": lambda: torch.ops.bnbx.lora_forward(big, grad, lora_A, lora_B, 2.0),
        "lora_backward": lambda: torch.ops.bnbx.lora_backward(grad, big, lora_A, lora_B, 2.0, True),
    }


OPS = _ops()


@needs_cache
@pytest.mark.parametrize("name", sorted(OPS))
def test_reused_output_is_written_in_full(cache, name):
    call = OPS[name]
    bnbx.set_cpu_cache_limit(0)
    expected = call()  # fresh memory, nothing reused
    bnbx.set_cpu_cache_limit(LIMIT)
    first = call()
    big = _largest(first)
    assert big.numel() * big.element_size() >= 8 << 20, "the test's output must be large enough to be cached"
    address = big.data_ptr()
    _poison(big)
    del first, big
    hits = bnbx.cpu_cache_stats()["hits"]
    second = call()
    assert bnbx.cpu_cache_stats()["hits"] == hits + 1
    assert _largest(second).data_ptr() == address, "the second output should reuse the poisoned block"
    expected = expected if isinstance(expected, tuple) else (expected,)
    second = second if isinstance(second, tuple) else (second,)
    for want, got in zip(expected, second):
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


@needs_cache
def test_reuse_limit_and_clear(cache):
    x = torch.randn(1024, 4096)  # 16 MiB
    stats = bnbx.cpu_cache_stats()
    y = bnbx.qat.fake_quantize(x, granularity="token")
    assert bnbx.cpu_cache_stats()["misses"] == stats["misses"] + 1
    assert bnbx.cpu_cache_stats()["in_use_bytes"] == stats["in_use_bytes"] + y.numel() * 4
    del y
    assert bnbx.cpu_cache_stats()["cached_bytes"] == x.numel() * 4
    assert bnbx.cpu_cache_stats()["in_use_bytes"] == stats["in_use_bytes"]  # other tests' live outputs
    bnbx.empty_cpu_cache()
    assert bnbx.cpu_cache_stats()["cached_bytes"] == 0
    bnbx.set_cpu_cache_limit(0)  # off: a freed output goes back to the system
    del_me = bnbx.qat.fake_quantize(x, granularity="token")
    del del_me
    assert bnbx.cpu_cache_stats()["cached_bytes"] == 0


@needs_cache
def test_mid_size_outputs_are_cached_in_64k_granules(cache):
    # From 1 MiB (a 1024 x 1024 bf16 weight dequantized for a backward pass): reused like the large ones, rounded
    # to 64 KiB rather than to 2 MiB huge pages.
    x = torch.randn(300, 1000)  # 1.14 MiB in fp32
    stats = bnbx.cpu_cache_stats()
    y = bnbx.qat.fake_quantize(x, granularity="token")
    granule = 64 << 10
    rounded = -(-y.numel() * 4 // granule) * granule
    assert bnbx.cpu_cache_stats()["in_use_bytes"] == stats["in_use_bytes"] + rounded
    address = y.data_ptr()
    del y
    assert bnbx.cpu_cache_stats()["cached_bytes"] == rounded
    z = bnbx.qat.fake_quantize(x, granularity="token")
    assert z.data_ptr() == address and bnbx.cpu_cache_stats()["hits"] == stats["hits"] + 1
    torch.testing.assert_close(z, bnbx.qat.fake_quantize(x.clone(), granularity="token"), rtol=0, atol=0)


def test_small_outputs_bypass_the_cache(cache):
    stats = bnbx.cpu_cache_stats()
    out = bnbx.qat.fake_quantize(torch.randn(64, 1000), granularity="token")  # 256 KB: below 1 MiB
    del out
    after = bnbx.cpu_cache_stats()
    assert (after["hits"], after["misses"], after["cached_bytes"]) == (stats["hits"], stats["misses"], 0)


def test_cached_outputs_behave_like_any_tensor(cache):
    x = torch.randn(1024, 4096)
    y = bnbx.qat.fake_quantize(x, granularity="token")
    values = y.clone()
    y.resize_(2048, 4096)  # the storage is resizable: it grows through the same allocator
    torch.testing.assert_close(y[:1024], values, rtol=0, atol=0)
    y.resize_(10)
    assert y.numel() == 10
    z = bnbx.qat.fake_quantize(x, granularity="token")
    assert torch.equal(torch.from_numpy(z.numpy()), z)
    buffer = io.BytesIO()
    torch.save(z, buffer)
    buffer.seek(0)
    assert torch.equal(torch.load(buffer), z)


@pytest.mark.parametrize("bad", [-1, 1.5, "1", True, 2**63])
def test_bad_limit(bad):
    with pytest.raises(ValueError, match="non-negative int"):
        bnbx.set_cpu_cache_limit(bad)


HUGE = ("99999999999999999999", (2**63 - 1) >> 20 << 20)  # more MiB than int64 bytes hold: the largest limit


@pytest.mark.parametrize("value, limit", [("0", 0), ("64", 64 << 20), ("lots", 1024 << 20), HUGE])
def test_environment_limit(value, limit):
    code = "import warnings, bnbx; print(bnbx.cpu_cache_stats()['limit_bytes'])"
    env = {**os.environ, "BNBX_CPU_CACHE_MB": value}
    result = subprocess.run(
        [sys.executable, "-W", "always", "-c", code], env=env, capture_output=True, text=True, check=True
    )
    if not SANITIZED:
        assert int(result.stdout.strip()) == limit
    assert ("is not a non-negative whole number" in result.stderr) == (value == "lots")


def _child_reuses_the_block(x: torch.Tensor, expected: torch.Tensor) -> None:
    torch.set_num_threads(1)  # OpenMP's pool does not survive fork (torch's DataLoader workers do the same)
    hits = bnbx.cpu_cache_stats()["hits"]
    ok = torch.equal(bnbx.qat.fake_quantize(x, granularity="token"), expected)
    sys.exit(0 if ok and bnbx.cpu_cache_stats()["hits"] == hits + 1 else 1)


@needs_cache
@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_forked_child_uses_the_cache(cache):
    # a child process starts with the parent's cache (its blocks are the child's copies) and an unlocked lock
    x = torch.randn(1024, 4096)
    expected = bnbx.qat.fake_quantize(x, granularity="token")
    del_me = bnbx.qat.fake_quantize(x, granularity="token")
    del del_me  # one cached block for the child to reuse
    child = multiprocessing.get_context("fork").Process(target=_child_reuses_the_block, args=(x, expected))
    child.start()
    child.join(timeout=60)  # a hung child fails the test instead of hanging the suite
    if child.exitcode is None:
        child.kill()
        child.join()
    assert child.exitcode == 0
