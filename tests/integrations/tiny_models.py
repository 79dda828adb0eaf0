"""Tiny causal LMs built from configs (no network): a random LLaMA and a word-level tokenizer trained on
a few sentences."""

from __future__ import annotations

import pytest
import torch
import transformers

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "a model is quantized to four bits and evaluated on held out text",
    "the capital of france is paris and the capital of italy is rome",
]


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"]))
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )


def tiny_llama(vocab_size: int = 64, tie: bool = False, seed: int = 0, hidden: int = 64, intermediate: int = 160):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tie,
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A saved tiny LLaMA + tokenizer directory (import this fixture into a test module to use it)."""
    tokenizer = tiny_tokenizer()
    model = tiny_llama(vocab_size=len(tokenizer))
    path = tmp_path / "tiny-llama"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
