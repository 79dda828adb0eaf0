"""README.md's example runs as written, and its commands are the ones CI runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def test_readme_example_runs():
    text = (ROOT / "README.md").read_text()
    example = re.search(r"```python\n(.*?)```", text, re.S)
    assert example, "README.md has no python example"
    namespace: dict = {}
    exec(compile(example.group(1), "README.md", "exec"), namespace)
    assert namespace["W_hat"].shape == (4096, 4096) and namespace["W_hat"].dtype == torch.bfloat16
    assert (namespace["W_hat"].float() - namespace["W"].float()).abs().mean() < 0.1


def test_readme_opens_with_the_two_commands_and_ci_runs_the_test_one():
    text = (ROOT / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.splitlines() if line.strip()]
    assert commands == ["make demo", "make test"]
    ci = ROOT / ".ci" / "run"
    if not ci.exists():
        pytest.skip("not a source checkout")
    assert "\nmake test\n" in ci.read_text()
