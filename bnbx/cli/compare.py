"""Quantize one model with several methods and compare size, bits per weight, perplexity, generation speed
and a greedy sample (``bnbx compare`` and ``bnbx demo``)."""

from __future__ import annotations

import copy
import time
from typing import Any, Optional, Sequence

import torch

from .. import eval as bnbx_eval
from ..integrations import quantize as Q
from ..integrations.config import BnbxConfig

#: the demo's rows: (label, method, BnbxConfig keyword arguments)
DEMO_METHODS: list[tuple[str, str, dict[str, Any]]] = [
    ("int8 absmax (per channel)", "absmax8", {}),
    ("int8 zero-point (per channel)", "zeropoint8", {}),
    ("LLM.int8() (threshold 6)", "llm.int8", {}),
    ("FP4", "fp4", {}),
    ("NF4", "nf4", {}),
    ("NF4 + double quant", "nf4", {"double_quant": True}),
    ("8-bit blockwise (dynamic)", "blockwise8", {}),
]


def parse_methods(text: str) -> list[tuple[str, str, dict[str, Any]]]:
    """``"nf4,fp4,nf4+dq,llm.int8"`` -> rows; ``+dq`` adds double quantization."""
    rows = []
    for item in [part.strip() for part in text.split(",") if part.strip()]:
        method, _, extra = item.partition("+")
        if method not in Q.METHODS:
            raise ValueError(
                f"unknown method {method!r}; choose from {', '.join(Q.METHODS)} (add +dq for double quant)"
            )
        if extra not in ("", "dq"):
            raise ValueError(f"unknown method option {extra!r} in {item!r}; the only one is +dq")
        rows.append((item, method, {"double_quant": True} if extra else {}))
    if not rows:
        raise ValueError("--methods is empty")
    return rows


def quantized_linear_stats(model: torch.nn.Module) -> tuple[int, int]:
    """(stored bytes, weights) over the model's bnbx quantized layers (weights, statistics, not biases)."""
    stored = weights = 0
    for module in model.modules():
        if isinstance(module, Q.quantized_layer_types()):
            weights += module.in_features * module.out_features
            for name, tensor in list(module.named_parameters(recurse=False)) + list(
                module.named_buffers(recurse=False)
            ):
                if name != "bias":
                    stored += tensor.numel() * tensor.element_size()
            state = getattr(module.weight, "quant_state", None)
            if state is not None:  # 4-bit: absmax (and nested statistics) live in the quant_state
                stored += sum(
                    t.numel() * t.element_size()
                    for t in state.as_dict(packed=True).values()
                    if isinstance(t, torch.Tensor)
                )
            scb = getattr(module.weight, "SCB", None)
            if isinstance(scb, torch.Tensor):
                stored += scb.numel() * scb.element_size()
    return stored, weights


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model as saved: every state_dict tensor once (tied weights once)."""
    seen: set[int] = set()
    total = 0
    for tensor in model.state_dict().values():
        if isinstance(tensor, torch.Tensor):
            key = tensor.data_ptr() if tensor.numel() else id(tensor)
            if key in seen:
                continue
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def compare(
    model: Any,
    tokenizer: Any,
    text: str,
    methods: Sequence[tuple[str, str, dict[str, Any]]],
    prompt: str = "The capital of France is",
    max_tokens: Optional[int] = 1024,
    window: int = 512,
    stride: int = 256,
    max_new_tokens: int = 24,
    baseline_label: str = "float32 (baseline)",
    progress: bool = True,
    keep_models: bool = False,
) -> list[dict[str, Any]]:
    """One row per method (the unquantized model first): size, bits per weight of the quantized linear layers,
    perplexity on ``text``, generation tokens/s and a greedy sample. ``model`` is not modified.
    A method whose layer this bnbx lacks gets ``available: False`` and no numbers."""
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    greedy = bnbx_eval.generation_config("greedy", max_new_tokens)
    entries = [(baseline_label, None, {})] + list(methods)
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional
        bar = entries
    else:
        bar = tqdm(entries, desc="methods", unit="method", disable=not progress)
    rows = []
    for label, method, options in bar:
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(label)
        row: dict[str, Any] = {"label": label, "method": method or "none", "available": True}
        if method is not None and Q.method_layer(method) is None:
            row["available"] = False
            rows.append(row)
            continue
        candidate = model
        quantize_seconds = 0.0
        if method is not None:
            candidate = copy.deepcopy(model)
            start = time.perf_counter()
            Q.replace_linear(candidate, BnbxConfig.for_method(method, **options))
            quantize_seconds = time.perf_counter() - start
        stored, weights = quantized_linear_stats(candidate)
        ppl = bnbx_eval.perplexity(candidate, tokenizer, input_ids=ids, window=window, stride=stride)
        sample = bnbx_eval.generate(candidate, tokenizer, prompt, **greedy)
        row.update(
            size_mb=model_bytes(candidate) / 1e6,
            # the unquantized model: the bits of its float linear weights
            bits_per_weight=stored * 8 / weights if weights else next(candidate.parameters()).element_size() * 8,
            quantized_weights=weights,
            perplexity=ppl["perplexity"],
            eval_tokens=ppl["tokens"],
            eval_tokens_per_s=ppl["tokens_per_s"],
            generate_tokens_per_s=sample["tokens_per_s"],
            quantize_seconds=quantize_seconds,
            sample=sample["text"],
        )
        if keep_models:
            row["model"] = candidate
        rows.append(row)
    return rows


def format_rows(rows: list[dict[str, Any]], prompt: str) -> str:
    """The comparison table, then one greedy sample per method."""
    header = f"{'method':<31} {'size MB':>8} {'bits/w':>7} {'perplexity':>10} {'vs base':>8} {'gen tok/s':>9}"
    lines = [header, "-" * len(header)]
    base = rows[0].get("perplexity")
    for row in rows:
        if not row["available"]:
            lines.append(f"{row['label']:<31} {'not available in this bnbx build':>46}")
            continue
        change = f"{(row['perplexity'] / base - 1) * 100:+.1f}%" if base and row is not rows[0] else ""
        lines.append(
            f"{row['label']:<31} {row['size_mb']:>8.1f} {row['bits_per_weight']:>7.2f} "
            f"{row['perplexity']:>10.3f} {change:>8} {row['generate_tokens_per_s']:>9.1f}"
        )
    lines.append("")
    lines.append(f"greedy continuation of {prompt!r}:")
    for row in rows:
        if row["available"]:
            lines.append(f"  {row['label']:<31} {row['sample'].strip()!r}")
    return "\n".join(lines)
