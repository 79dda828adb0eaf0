"""benchmarks/bench_qlora.py runs in both modes (separate processes, and --interleave) on a tiny model: every row
is printed. Nothing about speed is asserted (benchmarks measure it)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_qlora.py"
VARIANTS = ["fp32 LoRA", "bf16 LoRA", "bnbx QLoRA nf4", "bnbx QLoRA nf4+dq", "bitsandbytes QLoRA nf4+dq",
            "bitsandbytes+peft QLoRA nf4+dq"]
TINY = ["--hidden", "128", "--intermediate", "256", "--layers", "1", "--tokens", "16", "--repeat", "1"]


@pytest.mark.parametrize("mode", [[], ["--interleave", "--rounds", "2"]], ids=["processes", "interleave"])
def test_every_row_is_printed(mode):
    done = subprocess.run([sys.executable, str(BENCH), *TINY, *mode], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "failed" not in done.stderr, done.stderr[-2000:]
    names = [line[:30].strip() for line in done.stdout.splitlines()]
    rows = [name for name in names if name in VARIANTS]
    assert rows in (VARIANTS, VARIANTS[:4])  # the bitsandbytes rows when it is installed
