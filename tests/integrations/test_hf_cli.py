"""The bnbx command end to end, in subprocesses, on a tiny random LLaMA saved to a temporary directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

import bnbx.cli as cli  # noqa: E402
from bnbx.cli import compare as cli_compare  # noqa: E402
from tiny_models import tiny_model_dir  # noqa: E402,F401

ROOT = Path(__file__).resolve().parents[2]
TEXT = "the quick brown fox jumps over the lazy dog . " * 20


def bnbx_cli(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-m", "bnbx", *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT
    )


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return path


def test_quantize_eval_generate_round_trip(tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "nf4"
    result = bnbx_cli("quantize", str(tiny_model_dir), str(out), "--method", "nf4", "--double-quant")
    assert result.returncode == 0, result.stderr
    assert "saved nf4 model" in result.stdout
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (config["quant_method"], config["bnb_4bit_quant_type"], config["bnb_4bit_use_double_quant"]) == (
        "bnbx",
        "nf4",
        True,
    )

    result = bnbx_cli("eval", str(out), "--text", str(text_file), "--window", "32", "--stride", "16")
    assert result.returncode == 0, result.stderr
    assert "perplexity" in result.stdout and "tokens/s" in result.stdout

    result = bnbx_cli("generate", str(out), "--prompt", "the quick", "--max-new-tokens", "4")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("the quick") and "tokens/s" in result.stderr


@pytest.mark.parametrize("strategy", ["greedy", "beam", "sample"])
def test_generate_strategies(strategy, tiny_model_dir, capsys):
    assert (
        cli.main(
            [
                "generate",
                str(tiny_model_dir),
                "--prompt",
                "the quick",
                "--strategy",
                strategy,
                "--max-new-tokens",
                "4",
                "--num-beams",
                "2",
                "--top-k",
                "5",
                "--top-p",
                "0.9",
                "--temperature",
                "0.8",
                "--repetition-penalty",
                "1.1",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert captured.out.startswith("the quick") and f"tokens/s, {strategy}]" in captured.err


def test_compare_table(tiny_model_dir, text_file):
    result = bnbx_cli(
        "compare",
        str(tiny_model_dir),
        "--text",
        str(text_file),
        "--methods",
        "absmax8,nf4+dq,llm.int8",
        "--max-tokens",
        "64",
        "--window",
        "32",
        "--stride",
        "16",
        "--max-new-tokens",
        "3",
    )
    assert result.returncode == 0, result.stderr
    for label in ("float32 (baseline)", "absmax8", "nf4+dq", "llm.int8", "greedy continuation"):
        assert label in result.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["quantize", "{missing}", "{out}", "--method", "nf4"], "does not exist"),
        (["eval", "{model}", "--text", "{missing}"], "does not exist"),
        (["quantize", "{model}", "{out}", "--method", "absmax8", "--double-quant"], "double quantization"),
        (["generate", "{model}", "--prompt", "x", "--strategy", "beam", "--num-beams", "1"], "num_beams"),
        (["compare", "{model}", "--text", "{text}", "--methods", "nf3"], "unknown method"),
        (["eval", "{not_causal}", "--text", "{text}"], "not a causal language model"),
        (["eval", "{corrupt}", "--text", "{text}"], "cannot load the checkpoint"),
    ],
)
def test_clear_errors(args, message, tiny_model_dir, text_file, tmp_path, capsys):
    import transformers

    not_causal = tmp_path / "vit"
    transformers.ViTModel(
        transformers.ViTConfig(
            hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=8, patch_size=4
        )
    ).save_pretrained(not_causal)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    (corrupt / "model.safetensors").write_bytes((tiny_model_dir / "model.safetensors").read_bytes()[:1000])
    values = {
        "missing": tmp_path / "nope",
        "out": tmp_path / "out",
        "model": tiny_model_dir,
        "text": text_file,
        "not_causal": not_causal,
        "corrupt": corrupt,
    }
    assert cli.main([arg.format(**values) for arg in args]) == 2
    error = capsys.readouterr().err
    assert "bnbx: error: " in error and message in error and "Traceback" not in error


def test_unknown_method_is_a_usage_error(tiny_model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["quantize", str(tiny_model_dir), str(tmp_path / "o"), "--method", "int4"])
    assert exit_info.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_parse_methods():
    rows = cli_compare.parse_methods("nf4, nf4+dq,fp4")
    assert [(label, method, options) for label, method, options in rows] == [
        ("nf4", "nf4", {}),
        ("nf4+dq", "nf4", {"double_quant": True}),
        ("fp4", "fp4", {}),
    ]
    with pytest.raises(ValueError, match="only one is \\+dq"):
        cli_compare.parse_methods("nf4+xx")
