"""Finds and loads the compiled library ``bnbx/_C.so`` and reads its build facts.

Loading the library runs its ``TORCH_LIBRARY`` initialisers, which register every ``torch.ops.bnbx`` op.
The small C interface read here with ctypes (CPU instruction set, CUDA build) is build information only;
every op goes through the torch dispatcher.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

_PACKAGE_DIR = Path(__file__).resolve().parent

REBUILD_HINT = (
    "Reinstall bnbx against the torch you use: pip install --no-build-isolation . "
    "(see README.md). A CUDA build needs a CUDA torch and nvcc on PATH at build time."
)


def _find_library() -> Path:
    candidates = sorted(_PACKAGE_DIR.glob("_C*.so"))
    if not candidates:
        raise ImportError(f"bnbx: the compiled library bnbx/_C.so is missing from {_PACKAGE_DIR}. {REBUILD_HINT}")
    return candidates[0]


@functools.lru_cache(maxsize=None)
def load() -> ctypes.CDLL:
    """Load ``_C.so`` once; returns a ctypes handle to its build-info functions."""
    path = _find_library()
    try:
        torch.ops.load_library(str(path))
    except OSError as error:
        raise ImportError(
            f"bnbx: could not load {path} with torch {torch.__version__}: {error}. "
            f"It was probably built against another torch. {REBUILD_HINT}"
        ) from error
    handle = ctypes.CDLL(str(path))
    handle.bnbx_cpu_capability.restype = ctypes.c_char_p
    handle.bnbx_set_cpu_capability.argtypes = [ctypes.c_char_p]
    handle.bnbx_set_cpu_capability.restype = ctypes.c_int
    handle.bnbx_cpu_extensions.restype = ctypes.c_char_p
    handle.bnbx_cuda_built.restype = ctypes.c_int
    handle.bnbx_cuda_architectures.restype = ctypes.c_char_p
    handle.bnbx_cpu_cache_stats.argtypes = [ctypes.POINTER(ctypes.c_int64)]
    handle.bnbx_cpu_cache_stats.restype = None
    handle.bnbx_cpu_cache_set_limit.argtypes = [ctypes.c_int64]
    handle.bnbx_cpu_cache_set_limit.restype = None
    handle.bnbx_cpu_cache_clear.restype = None
    _check_cache_environment()
    return handle


def cpu_capability() -> str:
    """The instruction set the CPU kernels use in this process: ``"avx512"``, ``"avx2"`` or ``"scalar"``."""
    return load().bnbx_cpu_capability().decode()


def set_cpu_capability(name: str) -> None:
    """Switch the CPU kernels to ``name`` (``"scalar"``, ``"avx2"`` or ``"avx512"``) for this process.

    Meant for tests and benchmarks; users set the environment variable ``BNBX_CPU_CAPABILITY`` instead.
    Raises ``ValueError`` when the name is unknown or this CPU lacks the instruction set.
    """
    if not load().bnbx_set_cpu_capability(name.encode()):
        raise ValueError(f"CPU capability {name!r} is unknown or not supported by this CPU")


def cpu_extensions() -> list[str]:
    """CPU extensions beyond the active instruction set that some kernels use when present:
    ``"avx512_vnni"``, ``"avx512_bf16"``, ``"amx"`` (AMX tiles, with the OS permission granted)."""
    text = load().bnbx_cpu_extensions().decode()
    return text.split(",") if text else []


def cuda_built() -> bool:
    """True when this bnbx was compiled with its CUDA kernels."""
    return bool(load().bnbx_cuda_built())


def cuda_architectures() -> str:
    """The CUDA architectures compiled in, e.g. ``"80,86,89,90"``; empty for a CPU-only build."""
    return load().bnbx_cuda_architectures().decode()


# --- the cache of freed large CPU outputs (csrc/cpu/fresh_output.cpp) ----------------------------------------
_CACHE_STATS = ("limit_bytes", "cached_bytes", "in_use_bytes", "hits", "misses")


def cpu_cache_stats() -> dict[str, int]:
    """The cache of freed large CPU outputs: its limit, the bytes it holds for reuse, the bytes of live outputs
    that came from it, and how many large outputs reused a block (hits) or were newly mapped (misses).

    Large outputs (8 MiB and more) of bnbx's CPU ops get memory advised for transparent huge pages; when one is
    freed, its memory is kept (up to the limit) and handed to the next output of about the same size, so a
    training loop does not pay the page faults of fresh memory every step. ``BNBX_CPU_CACHE_MB`` sets the limit
    at import (default 1024 MiB; 0 turns the cache off); sanitizer builds keep it off.
    """
    values = (ctypes.c_int64 * len(_CACHE_STATS))()
    load().bnbx_cpu_cache_stats(values)
    return dict(zip(_CACHE_STATS, values))


def set_cpu_cache_limit(limit_bytes: int) -> None:
    """Keep at most ``limit_bytes`` of freed large CPU outputs for reuse (0 turns the cache off and frees what
    it holds). Live outputs are never affected."""
    if isinstance(limit_bytes, bool) or not isinstance(limit_bytes, int) or not 0 <= limit_bytes < 2**63:
        raise ValueError(
            f"set_cpu_cache_limit: limit_bytes must be a non-negative int below 2**63, got {limit_bytes!r}"
        )
    load().bnbx_cpu_cache_set_limit(limit_bytes)


def empty_cpu_cache() -> None:
    """Free the memory the CPU output cache holds for reuse (like ``torch.cuda.empty_cache``); the limit stays."""
    load().bnbx_cpu_cache_clear()


def _check_cache_environment() -> None:
    import os
    import warnings

    text = os.environ.get("BNBX_CPU_CACHE_MB", "")
    if text and not (text.isdigit()):
        warnings.warn(
            f"BNBX_CPU_CACHE_MB={text!r} is not a non-negative whole number of MiB; the default (1024) is used",
            stacklevel=3,
        )
