"""Builds and loads the host emulation of the CUDA kernels (csrc/cuda/emulation/): the ``.cu`` sources compiled
as C++ by g++ over a shim of the CUDA built-ins, every thread of a block run as a fiber. Tests call the same
launchers the CUDA ops call, with CPU tensors, and compare the bytes with the CPU kernels.

``BNBX_EMU_SANITIZE=address`` (set by ``make sanitize``) builds it with ASan + UBSan instead.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
EMULATION = CSRC / "cuda" / "emulation"
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
QUANT_TYPE_CODES = {"nf4": 0, "fp4": 1}

FLAGS = [
    "-std=c++20",
    "-O1",
    "-g",
    "-fPIC",
    "-DBNBX_CUDA_EMULATION",
    "-ffp-contract=off",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-Wno-unknown-pragmas",
    "-Wno-unused-parameter",
    f"-I{CSRC}",
]
SANITIZE_FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"]


def compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


def _sources() -> list[Path]:
    return sorted(EMULATION.glob("*.cpp"))


def _inputs_hash(flags: list[str]) -> str:
    digest = hashlib.sha256(" ".join(flags).encode())
    for path in sorted([*CSRC.rglob("*.h"), *CSRC.rglob("*.cuh"), *CSRC.rglob("*.cu"), *_sources()]):
        digest.update(str(path.relative_to(CSRC)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def build(sanitize: bool = False) -> Path:
    """Compile the emulation library (cached by a hash of every csrc header and source) and return its path."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("the CUDA emulation needs a C++ compiler (g++, or set CXX)")
    flags = FLAGS + (SANITIZE_FLAGS if sanitize else [])
    out_dir = Path(tempfile.gettempdir()) / f"bnbx-cuda-emu-{_inputs_hash(flags)}"
    library = out_dir / "libbnbx_cuda_emu.so"
    if library.exists():
        return library
    out_dir.mkdir(parents=True, exist_ok=True)

    def compile_one(source: Path) -> Path:
        obj = out_dir / (source.stem + ".o")
        subprocess.run([cxx, *flags, "-c", str(source), "-o", str(obj)], check=True, capture_output=True, text=True)
        return obj

    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            objects = list(pool.map(compile_one, _sources()))
    except subprocess.CalledProcessError as error:
        raise RuntimeError(f"building the CUDA emulation failed:\n{error.stderr}") from error
    partial = out_dir / f"libbnbx_cuda_emu.so.{os.getpid()}"
    subprocess.run([cxx, *flags, "-shared", *map(str, objects), "-o", str(partial)], check=True)
    partial.replace(library)  # atomic, so concurrent test runs never load a half-written library
    return library


class Emulator:
    """The launchers of csrc/cuda/*.cu run on CPU tensors; each method fills preallocated outputs."""

    def __init__(self, path: Path):
        self.lib = ctypes.CDLL(str(path))
        self.lib.bnbx_emu_error.restype = ctypes.c_char_p
        i64 = ctypes.c_int64
        for name in (
            "bnbx_emu_selftest",
            "bnbx_emu_wmma_selftest",
            "bnbx_emu_quantize_4bit",
            "bnbx_emu_dequantize_4bit",
            "bnbx_emu_quantize_blockwise",
            "bnbx_emu_dequantize_blockwise",
            "bnbx_emu_quantize_int8",
            "bnbx_emu_dequantize_int8",
            "bnbx_emu_fake_quantize_lsq",
            "bnbx_emu_fake_quantize_lsq_backward",
            "bnbx_emu_fake_quantize",
            "bnbx_emu_int8_outlier_columns",
            "bnbx_emu_int8_vectorwise_quant",
            "bnbx_emu_int8_vectorwise_dequant",
            "bnbx_emu_int8_gemm",
            "bnbx_emu_int8_mm_dequant",
            "bnbx_emu_gemv_4bit",
            "bnbx_emu_gemm_4bit_tiles",
            "bnbx_emu_decode_absmax",
        ):
            getattr(self.lib, name).restype = ctypes.c_int
        self.i64 = i64

    def _check(self, status: int) -> None:
        if status != 0:
            raise RuntimeError(f"emulated kernel failed: {self.lib.bnbx_emu_error().decode()}")

    @staticmethod
    def _ptr(t: torch.Tensor | None) -> ctypes.c_void_p | None:
        if t is None:
            return None
        assert t.is_contiguous() and t.device.type == "cpu"
        return ctypes.c_void_p(t.data_ptr())

    def quantize_4bit(self, A: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
        n = A.numel()
        packed = torch.full(((n + 1) // 2,), 0xAA, dtype=torch.uint8)  # poisoned: every byte must be written
        absmax = torch.full((-(-n // blocksize),), float("nan"), dtype=torch.float32)
        if n:
            self._check(
                self.lib.bnbx_emu_quantize_4bit(
                    DTYPE_CODES[A.dtype],
                    QUANT_TYPE_CODES[quant_type],
                    self._ptr(A),
                    self.i64(n),
                    self.i64(blocksize),
                    self._ptr(packed),
                    self._ptr(absmax),
                )
            )
        return packed, absmax

    def dequantize_4bit(
        self, packed: torch.Tensor, absmax: torch.Tensor, n: int, blocksize: int, quant_type: str, dtype: torch.dtype
    ) -> torch.Tensor:
        out = torch.full((n,), 12345.0, dtype=dtype)
        if n:
            self._check(
                self.lib.bnbx_emu_dequantize_4bit(
                    DTYPE_CODES[dtype],
                    QUANT_TYPE_CODES[quant_type],
                    self._ptr(packed),
                    self._ptr(absmax),
                    self.i64(n),
                    self.i64(blocksize),
                    self._ptr(out),
                )
            )
        return out

    def quantize_blockwise(self, A: torch.Tensor, code: torch.Tensor, blocksize: int):
        n = A.numel()
        codes = torch.full((n,), 0xAA, dtype=torch.uint8)
        absmax = torch.full((-(-n // blocksize),), float("nan"), dtype=torch.float32)
        if n:
            self._check(
                self.lib.bnbx_emu_quantize_blockwise(
                    DTYPE_CODES[A.dtype],
                    self._ptr(A),
                    self._ptr(code),
                    self.i64(n),
                    self.i64(blocksize),
                    self._ptr(codes),
                    self._ptr(absmax),
                )
            )
        return codes, absmax

    def dequantize_blockwise(self, codes, absmax, code, blocksize: int, dtype: torch.dtype) -> torch.Tensor:
        n = codes.numel()
        out = torch.full((n,), 12345.0, dtype=dtype)
        if n:
            self._check(
                self.lib.bnbx_emu_dequantize_blockwise(
                    DTYPE_CODES[dtype],
                    self._ptr(codes),
                    self._ptr(absmax),
                    self._ptr(code),
                    self.i64(n),
                    self.i64(blocksize),
                    self._ptr(out),
                )
            )
        return out

    def quantize_int8(self, A: torch.Tensor, group_size: int, symmetric: bool):
        n = A.numel()
        groups = -(-n // group_size)
        q = torch.full((n,), 0x55, dtype=torch.int8)
        scale = torch.full((groups,), float("nan"), dtype=torch.float32)
        zero_point = torch.full((groups,), -99, dtype=torch.int32)
        if n:
            self._check(
                self.lib.bnbx_emu_quantize_int8(
                    DTYPE_CODES[A.dtype],
                    self._ptr(A),
                    self.i64(n),
                    self.i64(group_size),
                    int(symmetric),
                    self._ptr(q),
                    self._ptr(scale),
                    self._ptr(zero_point),
                )
            )
        return q, scale, zero_point

    def dequantize_int8(self, q, scale, zero_point, group_size: int, dtype: torch.dtype) -> torch.Tensor:
        n = q.numel()
        out = torch.full((n,), 12345.0, dtype=dtype)
        if n:
            self._check(
                self.lib.bnbx_emu_dequantize_int8(
                    DTYPE_CODES[dtype],
                    self._ptr(q),
                    self._ptr(scale),
                    self._ptr(zero_point),
                    self.i64(n),
                    self.i64(group_size),
                    self._ptr(out),
                )
            )
        return out

    # LSQ: scale and offset hold one value or one per row of x (rows = the larger count)
    @staticmethod
    def _lsq_layout(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor):
        rows = max(scale.numel(), offset.numel()) if x.numel() else 0
        ct = torch.float64 if x.dtype == torch.float64 else torch.float32
        s, o = scale.to(ct).contiguous(), offset.to(ct).contiguous()
        return rows, (x.numel() // rows if rows else 0), int(scale.numel() > 1), int(offset.numel() > 1), s, o

    def fake_quantize_lsq(self, x, scale, offset, qmin: float, qmax: float) -> torch.Tensor:
        rows, inner, spr, opr, s, o = self._lsq_layout(x, scale, offset)
        out = torch.full_like(x, 12345.0)
        code = 3 if x.dtype == torch.float64 else DTYPE_CODES[x.dtype]
        args = (self._ptr(x), self._ptr(out), self.i64(rows), self.i64(inner), spr, opr, self._ptr(s), self._ptr(o))
        fn = self.lib.bnbx_emu_fake_quantize_lsq
        self._check(fn(code, *args, ctypes.c_double(qmin), ctypes.c_double(qmax)))
        return out

    def fake_quantize_lsq_backward(self, grad, x, scale, offset, qmin: float, qmax: float, grad_scale: float):
        """(grad_x, scale gradient, offset gradient); the two sums in float64, one value or one per row."""
        rows, inner, spr, opr, s, o = self._lsq_layout(x, scale, offset)
        grad_x = torch.full_like(x, 12345.0)
        scale_grad = torch.full((rows if spr else 1,), 12345.0, dtype=torch.float64)
        offset_grad = torch.full((rows if opr else 1,), 12345.0, dtype=torch.float64)
        code = 3 if x.dtype == torch.float64 else DTYPE_CODES[x.dtype]
        self._check(
            self.lib.bnbx_emu_fake_quantize_lsq_backward(
                code,
                self._ptr(grad),
                self._ptr(x),
                self._ptr(grad_x),
                self.i64(rows),
                self.i64(inner),
                spr,
                opr,
                self._ptr(s),
                self._ptr(o),
                ctypes.c_double(qmin),
                ctypes.c_double(qmax),
                ctypes.c_double(grad_scale),
                self._ptr(scale_grad),
                self._ptr(offset_grad),
            )
        )
        return grad_x, scale_grad, offset_grad

    # --- MinMax fake_quantize: out, scale, zero_point, and how many segments the split path used (0: none) ---

    def fake_quantize(self, x, group_size: int, bits: int, symmetric: bool, full_range: bool):
        n = x.numel()
        groups = -(-n // group_size)
        out = torch.full_like(x, 12345.0)
        scale = torch.full((groups,), float("nan"), dtype=torch.float32)
        zero_point = torch.full((groups,), -99, dtype=torch.int32)
        segments = ctypes.c_int64(-1)
        self._check(
            self.lib.bnbx_emu_fake_quantize(
                DTYPE_CODES[x.dtype],
                self._ptr(x),
                self._ptr(out),
                self.i64(n),
                self.i64(group_size),
                self.i64(bits),
                int(symmetric),
                int(full_range),
                self._ptr(scale),
                self._ptr(zero_point),
                ctypes.byref(segments),
            )
        )
        return out, scale, zero_point, segments.value

    # --- LLM.int8(): the kernels, and the CUDA host code's steps around them (csrc/cuda/int8_matmul.cu) ---

    @staticmethod
    def _threshold_in_dtype(threshold: float, dtype: torch.dtype) -> float:
        return torch.tensor(threshold, dtype=torch.float32).to(dtype).item()

    def _int8_quant_into(self, a2: torch.Tensor, threshold: float):
        """quant_into of the host code: q, stats and the outlier columns of the contiguous a2 [rows, K]."""
        rows, K = a2.shape
        q = torch.full((rows, K), 0x55, dtype=torch.int8)
        stats = torch.full((rows,), float("nan"), dtype=torch.float32)
        cols = torch.empty(0, dtype=torch.long)
        if rows == 0 or K == 0:
            return q, stats.zero_(), cols
        code = DTYPE_CODES[a2.dtype]
        mask = None
        if threshold > 0:
            mask = torch.zeros(K, dtype=torch.uint8)
            fn = self.lib.bnbx_emu_int8_outlier_columns
            self._check(
                fn(code, self._ptr(a2), self.i64(rows), self.i64(K), ctypes.c_float(threshold), self._ptr(mask))
            )
            cols = mask.nonzero().flatten()
        mask_arg = mask if cols.numel() else None
        fn = self.lib.bnbx_emu_int8_vectorwise_quant
        args = (self._ptr(a2), self.i64(rows), self.i64(K), ctypes.c_float(threshold), self._ptr(mask_arg))
        self._check(fn(code, *args, self._ptr(q), self._ptr(stats)))
        return q, stats, cols

    def int8_vectorwise_quant(self, A: torch.Tensor, threshold: float = 0.0):
        K = A.shape[-1]
        a2 = A.contiguous().reshape(math.prod(A.shape[:-1]), K)
        q, stats, cols = self._int8_quant_into(a2, self._threshold_in_dtype(threshold, A.dtype))
        return q.reshape(A.shape), stats, cols

    def int8_vectorwise_dequant(self, q: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
        out = torch.full(q.shape, 12345.0, dtype=torch.float32)
        if q.numel():
            fn = self.lib.bnbx_emu_int8_vectorwise_dequant
            args = (self._ptr(q), self._ptr(stats), self.i64(q.numel()), self.i64(q.shape[-1]), self._ptr(out))
            self._check(fn(*args))
        return out

    def int8_linear_matmul(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        K, N = A.shape[-1], B.shape[0]
        a2 = A.contiguous().reshape(math.prod(A.shape[:-1]), K)
        C = torch.full((a2.shape[0], N), -12345, dtype=torch.int32)
        fn = self.lib.bnbx_emu_int8_gemm
        self._check(fn(self._ptr(a2), self._ptr(B), self._ptr(C), self.i64(a2.shape[0]), self.i64(N), self.i64(K)))
        return C.reshape(*A.shape[:-1], N)

    def _mm_dequant(self, C, row_stats, col_stats, bias32, a_out, b_out, dtype) -> torch.Tensor:
        rows, N = C.shape
        out = torch.full((rows, N), 12345.0, dtype=dtype)
        n_out = 0 if a_out is None else a_out.shape[1]
        fn = self.lib.bnbx_emu_int8_mm_dequant
        args = (self._ptr(C), self._ptr(row_stats), self._ptr(col_stats), self._ptr(bias32))
        args += (self._ptr(a_out), self._ptr(b_out), self.i64(n_out), self._ptr(out), self.i64(rows), self.i64(N))
        self._check(fn(DTYPE_CODES[dtype], *args))
        return out

    def int8_mm_dequant(self, C, row_stats, col_stats, dtype=torch.float16, bias=None) -> torch.Tensor:
        N = C.shape[-1]
        bias32 = None if bias is None else bias.to(torch.float32).contiguous()
        out = self._mm_dequant(C.reshape(-1, N).contiguous(), row_stats, col_stats, bias32, None, None, dtype)
        return out.reshape(C.shape)

    def int8_mixed_linear(self, A, CB, SCB, bias=None, threshold: float = 0.0) -> torch.Tensor:
        """int8_mixed_linear_cuda step by step: the emulated kernels, torch for the host's gathers and addmm."""
        K, N = A.shape[-1], CB.shape[0]
        a2 = A.contiguous().reshape(math.prod(A.shape[:-1]), K)
        q, stats, cols = self._int8_quant_into(a2, self._threshold_in_dtype(threshold, A.dtype))
        C = self.int8_linear_matmul(q, CB)
        n_out = cols.numel()
        a_out = b_out = None
        if n_out:
            a_out = a2.index_select(1, cols).float().contiguous()
            b_out = CB.index_select(1, cols).float().mul(SCB.reshape(N, 1)).mul_(7.874015718698502e-3).t().contiguous()
        bias32 = None if bias is None else bias.to(torch.float32).contiguous()
        if n_out > 32:  # kFusedOutliers: the epilogue in fp32, then one addmm
            out32 = self._mm_dequant(C, stats, SCB, bias32, None, None, torch.float32)
            out = out32.addmm_(a_out, b_out).to(A.dtype)
        else:
            out = self._mm_dequant(C, stats, SCB, bias32, a_out, b_out, A.dtype)
        return out.reshape(*A.shape[:-1], N)

    # --- gemm_4bit: the GEMV (M <= 8), the tensor-core tiles (fp16/bf16, 8 < M <= TILES_MAX_ROWS), and the
    # large-M path's decode + dequantize (its at::mm is cuBLAS) ---

    GEMV_MAX_ROWS = 8
    TILES_MAX_ROWS = 64  # kTilesMaxRows in csrc/cuda/gemm_4bit.cu

    def decode_absmax(self, absmax_q, nested_absmax, nested_code, nested_offset, nested_blocksize: int):
        out = torch.full((absmax_q.numel(),), float("nan"), dtype=torch.float32)
        fn = self.lib.bnbx_emu_decode_absmax
        offset = nested_offset.reshape(1).contiguous()
        args = (self._ptr(absmax_q), self._ptr(nested_absmax), self._ptr(nested_code), self._ptr(offset))
        self._check(fn(*args, self.i64(nested_blocksize), self.i64(absmax_q.numel()), self._ptr(out)))
        return out

    def gemm_4bit(
        self, A, B, absmax, blocksize: int, quant_type: str, shape, bias=None, nested=None, tiles_max_rows=None
    ):
        """gemm_4bit_cuda for K >= 1; ``nested`` = (nested_absmax, nested_code, nested_offset, nested_blocksize);
        ``tiles_max_rows`` stands for BNBX_CUDA_GEMM_4BIT_TILES_MAX_M."""
        N, K = shape
        a2 = A.contiguous().reshape(math.prod(A.shape[:-1]), K)
        M = a2.shape[0]
        tiles_max_rows = self.TILES_MAX_ROWS if tiles_max_rows is None else tiles_max_rows
        tiles = self.GEMV_MAX_ROWS < M <= tiles_max_rows and A.dtype != torch.float32
        if M > self.GEMV_MAX_ROWS and not tiles:
            decoded = absmax if nested is None else self.decode_absmax(absmax, *nested)
            weight = self.dequantize_4bit(B, decoded, N * K, blocksize, quant_type, A.dtype).reshape(N, K)
            out = a2 @ weight.t()  # cuBLAS on a GPU
            if bias is not None:
                out += bias
            return out.reshape(*A.shape[:-1], N)
        out = torch.full((M, N), 12345.0, dtype=A.dtype)  # poisoned: every element must be written
        if nested is None:
            scales = (self._ptr(absmax), None, None, None, self.i64(0))
        else:
            nested_absmax, nested_code, nested_offset, nested_blocksize = nested
            offset = nested_offset.reshape(1).contiguous()
            scales = (self._ptr(absmax), self._ptr(nested_absmax), self._ptr(nested_code), self._ptr(offset))
            scales += (self.i64(nested_blocksize),)
        fn = self.lib.bnbx_emu_gemm_4bit_tiles if tiles else self.lib.bnbx_emu_gemv_4bit
        args = (DTYPE_CODES[A.dtype], QUANT_TYPE_CODES[quant_type], self._ptr(a2), self._ptr(B), *scales)
        args += (self._ptr(bias), self.i64(M), self.i64(K), self.i64(N), self.i64(blocksize), self._ptr(out))
        self._check(fn(*args))
        return out.reshape(*A.shape[:-1], N)


@functools.cache
def load() -> Emulator:
    return Emulator(build(sanitize=os.environ.get("BNBX_EMU_SANITIZE", "") == "address"))
