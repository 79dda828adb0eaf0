"""The prepared GPU check (benchmarks/gpu_check.py, make gpu-check) in its dry-run mode: every step that needs
no GPU runs here (configure, test collection, the sanitizer cases on the CPU, a tiny benchmark), so the few
minutes of a lent GPU are never lost to a typo."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run(tmp_path):
    report = tmp_path / "report.md"
    result = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--report", str(report), "--scratch", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=900, check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    text = report.read_text()
    for step in ("env", "build", "tests", "sanitizer", "bench"):
        assert f"| {step} |" in text
    assert "FAILED" not in text
    assert "dry (collected)" in text and "dry (cases ran on cpu)" in text and "dry (cpu, tiny)" in text
    assert "| op quantize_4bit nf4" in text  # the benchmark tables came out
    assert "| tiles ms | cublas ms |" in text


def test_compute_sanitizer_lookup_finds_a_wheel_binary(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check

    binary = tmp_path / "nvidia" / "cuda_sanitizer_api" / "compute-sanitizer" / "compute-sanitizer"
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setattr(sys, "path", [str(tmp_path)] + sys.path)
    found = gpu_check.find_compute_sanitizer()
    assert found is not None
    if not Path("/usr/local/cuda/bin/compute-sanitizer").exists():
        assert found == str(binary)
