"""The command line: `python -m bnbx env` and the demo's table."""

from __future__ import annotations

import subprocess
import sys

import torch

import bnbx
from bnbx import __main__ as cli


def test_env_reports_build_facts(capsys):
    assert cli.main(["env"]) == 0
    report = capsys.readouterr().out
    assert f"torch               {torch.__version__}" in report
    assert bnbx.cpu_capability() in report
    assert ("built for sm_" in report) == bnbx.cuda_built()


def test_demo_table_orders_formats_by_quality():
    weights = {name: w[:64, :64].contiguous() for name, w in cli.demo_model(seed=1).items()}
    rows = {row["format"]: row for row in cli.demo_table(weights)}
    assert rows["nf4 blocksize 64"]["bits"] == 4.5
    # 4.127 bits for large weights; the per-tensor nested absmax and offset add a little on 64x64 ones
    assert 4.127 <= rows["nf4 blocksize 64 + double quant"]["bits"] < 4.15
    # more bits, less error: int8 beats nf4 beats fp4 on normal-like weights
    snr = {name: row["snr_db"] for name, row in rows.items()}
    assert snr["int8 absmax per channel"] > snr["nf4 blocksize 64"] > snr["fp4 blocksize 64"]
    assert "nf4 blocksize 64" in cli.format_table(list(rows.values()))


def test_module_runs_as_a_program():
    result = subprocess.run([sys.executable, "-m", "bnbx", "env"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "bnbx CPU kernels" in result.stdout
