"""A tiny transformers Llama built in the test (no downloads), optionally with NF4 Linear4bit layers, and a
short English text tokenized as bytes."""

from __future__ import annotations

import torch
from torch import nn

import bnbx

# A few sentences written for these tests: real text with repeated words and structure to learn.
TEXT = (
    "Quantization stores each weight of a neural network in fewer bits. A block of sixty-four weights shares "
    "one scale, and each weight becomes the index of the nearest value in a small table of sixteen numbers. "
    "The table is spaced so that every value is used equally often when the weights follow a normal "
    "distribution. To fine-tune such a model, the quantized weights stay frozen and two small matrices are "
    "trained beside each layer. Their product is added to the output of the layer, so the model learns a "
    "low-rank correction while the large weights never change. After training, the correction can be added "
    "to the dequantized weights once, giving a dense model that needs no adapter at all. "
)


def tiny_llama(hidden=128, layers=4, intermediate=352, seed=0, dtype=torch.float32, init=0.02):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
        use_cache=False, initializer_range=init,
    )
    return LlamaForCausalLM(config).to(dtype)


def quantize_linears(model: nn.Module, compute_dtype=torch.bfloat16, quant_storage=torch.uint8,
                     skip=("lm_head",)) -> nn.Module:
    """Replace every nn.Linear but ``skip`` by an NF4 double-quantized bnbx Linear4bit, in place."""
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and name.rsplit(".", 1)[-1] not in skip:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, bnbx.nn.Linear4bit.from_linear(
                module, compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=True,
                quant_storage=quant_storage))
    model.is_loaded_in_4bit = True
    return model


def token_batches(steps, batch=8, length=64, seed=0):
    data = torch.tensor(list(TEXT.encode()), dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - length, (batch,), generator=generator)
        yield torch.stack([data[s:s + length] for s in starts.tolist()])
