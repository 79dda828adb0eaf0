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
