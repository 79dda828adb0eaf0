"""The build refuses fast-math for the kernels (it would change NaN, Inf and subnormal blocks): CMake checks
the flags, and every kernel header stops the compiler with a clear #error."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
@pytest.mark.parametrize("flag", ["-ffast-math", "-Ofast"])
def test_kernel_headers_refuse_fast_math(flag):
    for header in ("csrc/common/formats.h", "csrc/cuda/emulation/cuda_shim.h"):
        result = subprocess.run(
            ["g++", "-std=c++20", "-DBNBX_CUDA_EMULATION", flag, "-fsyntax-only", "-x", "c++", header],
            cwd=ROOT, capture_output=True, text=True, check=False,
        )
        assert result.returncode != 0
        assert "without -ffast-math" in result.stderr or "without fast-math" in result.stderr


@pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake")
def test_cmake_refuses_fast_math(tmp_path):
    result = subprocess.run(
        ["cmake", "-S", str(ROOT), "-B", str(tmp_path), "-DBNBX_CUDA=OFF", "-DCMAKE_CXX_FLAGS=-O2 -ffast-math",
         f"-DPython_EXECUTABLE={sys.executable}"],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode != 0
    assert "must be built without fast-math" in " ".join(result.stderr.split())
