"""Evaluation of causal language models: held-out text, sliding-window perplexity, generation speed.

The held-out text ships with bnbx (``bnbx/data/heldout.txt``, provenance and licence in
``bnbx/data/PROVENANCE.md``): pytest's changelog for the releases of June 2025 to October 2026, written
after SmolLM2 (released November 2024) was trained, so it cannot be in its training data.
"""

from __future__ import annotations

import math
import time
from importlib import resources
from typing import Any, Sequence

import torch

HELDOUT_NAME = "pytest changelog 8.4.0-9.2.0 (2025-06 to 2026-10, MIT)"


def heldout_text() -> str:
    """The held-out evaluation text shipped with bnbx (about 76 KB of English)."""
    return resources.files("bnbx").joinpath("data/heldout.txt").read_text(encoding="utf-8")


def _token_ids(tokenizer: Any, text: str, max_tokens: int | None) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if max_tokens is not None:
        if max_tokens < 2:
            raise ValueError(f"max_tokens must be at least 2, got {max_tokens}")
        ids = ids[:max_tokens]
    return ids


@torch.no_grad()
def perplexity(
    model: Any,
    tokenizer: Any,
    text: str | None = None,
    *,
    input_ids: torch.Tensor | None = None,
    window: int = 512,
    stride: int = 256,
    max_tokens: int | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Perplexity of ``text`` (or ``input_ids``, 1-D) with a sliding window.

    Each window of ``window`` tokens starts ``stride`` tokens after the previous one; only the tokens
    not scored by an earlier window count, so with ``stride < window`` every token after the first is scored
    exactly once, with at least ``window - stride`` tokens of context (except in the first window); with
    ``stride == window`` the first token of each window is not scored. Returns perplexity,
    the number of scored tokens, seconds, and scored tokens per second.
    """
    if not 0 < stride <= window:
        raise ValueError(f"stride must be in (0, window]; got stride={stride}, window={window}")
    if input_ids is None:
        if text is None:
            raise ValueError("pass text or input_ids")
        input_ids = _token_ids(tokenizer, text, max_tokens)
    elif max_tokens is not None:
        input_ids = input_ids[:max_tokens]
    if input_ids.dim() != 1 or input_ids.numel() < 2:
        raise ValueError(f"need at least 2 tokens of text in a 1-D tensor, got shape {tuple(input_ids.shape)}")
    device = next(model.parameters()).device
    n = input_ids.numel()
    starts = list(range(0, max(n - window, 0) + stride, stride))
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: no bar then
        bar = starts
    else:
        bar = tqdm(starts, desc="perplexity", unit="window", disable=not progress, leave=False)
    nll = 0.0
    scored = 0
    scored_until = 1  # token 0 is never predicted
    begin_time = time.perf_counter()
    for start in bar:
        end = min(start + window, n)
        if end <= scored_until:
            break
        chunk = input_ids[start:end].unsqueeze(0).to(device)
        logits = model(chunk).logits[0, :-1].float()
        targets = chunk[0, 1:]
        log_probs = torch.log_softmax(logits, dim=-1).gather(1, targets.unsqueeze(1)).squeeze(1)
        # the first target not scored by an earlier window; with stride == window the window's first
        # token has no context inside the window and stays unscored, as in transformers' recipe
        first = max(scored_until - start - 1, 0)
        nll -= log_probs[first:].double().sum().item()
        scored += log_probs.numel() - first
        scored_until = end
    seconds = time.perf_counter() - begin_time
    return {
        "perplexity": math.exp(nll / scored),
        "tokens": scored,
        "seconds": seconds,
        "tokens_per_s": scored / seconds,
    }


def generation_config(
    strategy: str = "greedy",
    max_new_tokens: int = 32,
    num_beams: int = 4,
    temperature: float = 0.7,
    top_k: int = 50,
    top_p: float = 0.9,
    repetition_penalty: float = 1.0,
) -> dict[str, Any]:
    """``generate`` keyword arguments for a decoding strategy: greedy, beam or sample."""
    if strategy not in ("greedy", "beam", "sample"):
        raise ValueError(f"strategy must be one of greedy, beam, sample; got {strategy!r}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be positive, got {repetition_penalty}")
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "repetition_penalty": repetition_penalty}
    if strategy == "greedy":
        kwargs.update(do_sample=False, num_beams=1)
    elif strategy == "beam":
        if num_beams < 2:
            raise ValueError(f"beam search needs num_beams >= 2, got {num_beams}")
        kwargs.update(do_sample=False, num_beams=num_beams)
    else:
        if temperature <= 0:
            raise ValueError(f"temperature must be positive for sampling, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        kwargs.update(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)
    return kwargs


@torch.no_grad()
def generate(model: Any, tokenizer: Any, prompt: str, **generate_kwargs: Any) -> dict[str, Any]:
    """Generate from ``prompt``; returns the new text, the number of new tokens, seconds and tokens/s.

    ``generate_kwargs`` as from ``generation_config`` (greedy, 32 new tokens by default).
    """
    kwargs = generation_config() if not generate_kwargs else dict(generate_kwargs)
    device = next(model.parameters()).device
    encoded = tokenizer(prompt, return_tensors="pt").to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    start = time.perf_counter()
    output = model.generate(**encoded, pad_token_id=pad, **kwargs)
    seconds = time.perf_counter() - start
    new = output[0, encoded.input_ids.shape[1] :]
    return {
        "text": tokenizer.decode(new, skip_special_tokens=True),
        "new_tokens": int(new.numel()),
        "seconds": seconds,
        "tokens_per_s": new.numel() / seconds,
    }


def model_size_bytes(model: Any) -> int:
    """Bytes of every parameter and buffer of ``model`` as stored (packed weights at their packed size)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    total += sum(b.numel() * b.element_size() for b in model.buffers())
    return total


def linear_weight_count(model: Any, names: Sequence[str] | None = None) -> int:
    """Number of weights (logical elements) in ``torch.nn.Linear`` layers; those of quantized layers count
    their unpacked shape (``in_features * out_features``)."""
    count = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and (names is None or name in names):
            count += module.in_features * module.out_features
    return count
