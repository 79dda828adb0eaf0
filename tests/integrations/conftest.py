"""Fixtures: a tiny LLaMA + tokenizer saved with save_pretrained to a temporary directory."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from tiny_models import tiny_llama, tiny_tokenizer  # noqa: E402


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A saved tiny LLaMA + tokenizer directory."""
    tokenizer = tiny_tokenizer()
    model = tiny_llama(vocab_size=len(tokenizer))
    path = tmp_path / "tiny-llama"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
