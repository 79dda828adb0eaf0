"""KV-cache fake quantization for Hugging Face Llama-style attention.

The attention modules of transformers' Llama family call ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]``
with the post-RoPE keys and the values after the cache update (``[batch, kv_heads, tokens, head_dim]``).
bnbx registers wrappers ``bnbx_kv_sdpa`` / ``bnbx_kv_eager`` that fake-quantize K and V there and then run the
original implementation. Every scale covers one token (all heads: ``"token"``) or one token of one head
(``"head"``), so quantizing the whole cache at each step gives exactly what quantizing each token once, as it
enters the cache, would give: the values attention reads are those an int KV cache would hold.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from .ops import fake_quantize

_PREFIX = "bnbx_kv_"
_INNER = ("sdpa", "eager")


class KVFakeQuant(nn.Module):
    """Fake quantization of one attention module's keys and values; attached as ``attn.kv_quantizer``."""

    def __init__(
        self, bits: int, granularity: str = "token", symmetric: bool = True, range: str = "restricted"
    ) -> None:
        super().__init__()
        if granularity not in ("token", "head"):
            raise ValueError(f"KVFakeQuant: granularity must be 'token' or 'head', got {granularity!r}")
        self.bits, self.granularity, self.symmetric, self.range = bits, granularity, symmetric, range

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        """``states``: ``[batch, heads, tokens, head_dim]``."""
        if states.numel() == 0:
            return states
        if self.granularity == "head":
            return fake_quantize(states, self.bits, self.symmetric, "token", range=self.range)
        b, h, t, d = states.shape
        per_token = states.transpose(1, 2).reshape(b, t, h * d)
        out = fake_quantize(per_token, self.bits, self.symmetric, "token", range=self.range)
        return out.reshape(b, t, h, d).transpose(1, 2)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, granularity={self.granularity}"


def _make_attention(inner: str):
    def attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
        quantizer = getattr(module, "kv_quantizer", None)
        if quantizer is not None:
            key, value = quantizer(key), quantizer(value)
        if inner == "sdpa":
            from transformers.integrations.sdpa_attention import sdpa_attention_forward

            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        eager = sys.modules[type(module).__module__].eager_attention_forward
        return eager(module, query, key, value, attention_mask, **kwargs)

    return attention


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    for inner in _INNER:
        name = _PREFIX + inner
        if name not in AttentionInterface._global_mapping:
            AttentionInterface.register(name, _make_attention(inner))
            AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[inner])


def attach_kv_fake_quant(model: nn.Module, attention_modules: dict[str, nn.Module], quantizer_args: dict) -> None:
    """Attach a KVFakeQuant to each attention module and route the model's attention through the wrapper."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "_attn_implementation"):
        raise ValueError("prepare: kv_bits < 16 needs a Hugging Face model (with a config) using Llama-style attention")
    current = config._attn_implementation or "sdpa"
    inner = current.removeprefix(_PREFIX)
    if inner not in _INNER:
        raise ValueError(
            f"prepare: KV-cache fake quantization supports attn_implementation 'sdpa' or 'eager', got {current!r}"
        )
    _register()
    for module in attention_modules.values():
        module.kv_quantizer = KVFakeQuant(**quantizer_args)
    config._attn_implementation = _PREFIX + inner


def is_llama_attention(module: nn.Module) -> bool:
    """Llama-style attention: k_proj and v_proj Linears, a head_dim and a layer_idx (transformers' layout)."""
    return all(hasattr(module, name) for name in ("k_proj", "v_proj", "head_dim", "layer_idx"))
