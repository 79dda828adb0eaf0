"""Data-free distillation (LLM-QAT): the full-precision model writes its own training text, and the
fake-quantized student learns the teacher's next-token distributions on it.

- :func:`generate_data`: the first token drawn from the vocabulary, the next tokens greedy up to a prefix of
  3 to 5 tokens, the rest sampled (temperature, top-k, top-p); batched with a KV cache; resumable jsonl.
- :func:`distill`: KL(teacher || student) at temperature T, mean per token, computed over chunks of positions
  from the final hidden states, so full-vocabulary logits and probabilities exist for one chunk at a time.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
from collections.abc import Iterable, Sequence
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

try:
    from tqdm.auto import tqdm
except ImportError:  # tqdm is optional (pip install bnbx[qat]); without it there is no progress bar

    class tqdm:  # noqa: N801
        def __init__(self, *args, **kwargs) -> None:
            pass

        def update(self, n: int = 1) -> None:
            pass

        def set_postfix(self, **kwargs) -> None:
            pass

        def close(self) -> None:
            pass


logger = logging.getLogger(__name__)


def _filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens before it already hold top_p of the mass (the first always stays)
        drop_sorted = probs.cumsum(-1) - probs > top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _vocab_candidates(tokenizer, vocab_size: int) -> torch.Tensor:
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids = [i for i in range(vocab_size) if i not in special]
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def generate_data(
    teacher: nn.Module,
    tokenizer,
    n_samples: int,
    seq_len: int,
    greedy_prefix: tuple[int, int] = (3, 5),
    temperature: float = 1.0,
    top_k: int = 50,
    top_p: float = 1.0,
    path: Optional[Union[str, os.PathLike]] = None,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> list[dict]:
    """Generate ``n_samples`` sequences of up to ``seq_len`` tokens from ``teacher`` without any dataset.

    Sample ``i`` starts with a token drawn uniformly from the vocabulary (special tokens excluded), continues
    greedily up to a prefix of ``greedy_prefix[0] + i % (span)`` tokens (3, 4, 5, 3, ... by default), then
    samples at ``temperature`` with ``top_k`` / ``top_p`` until ``seq_len`` tokens or the end-of-sequence token.

    Returns a list of ``{"input_ids": [...], "text": ...}``. With ``path``, lines are appended to that jsonl
    file as each batch finishes, and a rerun resumes after the samples already there.
    """
    if not isinstance(n_samples, int) or n_samples < 0:
        raise ValueError(f"generate_data: n_samples must be a non-negative integer, got {n_samples!r}")
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"generate_data: seq_len must be an integer >= 2, got {seq_len!r}")
    low, high = greedy_prefix
    if not 1 <= low <= high:
        raise ValueError(f"generate_data: greedy_prefix must be (low, high) with 1 <= low <= high, got {greedy_prefix}")
    if temperature <= 0:
        raise ValueError(f"generate_data: temperature must be positive, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"generate_data: top_p must be in (0, 1], got {top_p}")
    samples: list[dict] = []
    if path is not None and os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            samples = [json.loads(line) for line in f if line.strip()]
        samples = samples[:n_samples]
    device = next(teacher.parameters()).device
    vocab_size = teacher.get_output_embeddings().weight.shape[0]
    candidates = _vocab_candidates(tokenizer, vocab_size)
    eos = getattr(tokenizer, "eos_token_id", None)
    # transformers 5.24 renamed past_key_values to cache (the old name warns until 5.40)
    cache_arg = "cache" if "cache" in inspect.signature(teacher.forward).parameters else "past_key_values"
    was_training = teacher.training
    teacher.eval()
    bar = tqdm(total=n_samples, initial=len(samples), desc="generate_data", disable=not progress)
    out_file = open(path, "a", encoding="utf-8") if path is not None else None
    try:
        while len(samples) < n_samples:
            start = len(samples)
            count = min(batch_size, n_samples - start)
            generator = torch.Generator().manual_seed(seed + start)
            first = candidates[torch.randint(len(candidates), (count,), generator=generator)]
            prefix = torch.tensor([low + (start + i) % (high - low + 1) for i in range(count)])
            ids = first[:, None].to(device)
            done = torch.zeros(count, dtype=torch.bool, device=device)
            lengths = torch.full((count,), seq_len, dtype=torch.long)
            cache, step_input = None, ids
            for position in range(1, seq_len):
                out = teacher(input_ids=step_input, use_cache=True, **{cache_arg: cache})
                cache = out.past_key_values
                logits = out.logits[:, -1, :].float()
                greedy = logits.argmax(-1)
                probs = _filter_logits(logits / temperature, top_k, top_p).softmax(-1)
                sampled = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(device)
                next_token = torch.where((position < prefix).to(device), greedy, sampled)
                if eos is not None:
                    finished_now = (next_token == eos) & ~done
                    lengths[finished_now.cpu()] = position + 1
                    done |= finished_now
                ids = torch.cat([ids, next_token[:, None]], 1)
                step_input = next_token[:, None]
                if bool(done.all()):
                    break
            for row in range(count):
                tokens = ids[row, : lengths[row]].tolist()
                sample = {"input_ids": tokens, "text": tokenizer.decode(tokens, skip_special_tokens=True)}
                samples.append(sample)
                if out_file is not None:
                    out_file.write(json.dumps(sample) + "\n")
            if out_file is not None:
                out_file.flush()
            bar.update(count)
    finally:
        bar.close()
        if out_file is not None:
            out_file.close()
        teacher.train(was_training)
    return samples


def kd_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    student_head: nn.Module,
    teacher_head: nn.Module,
    temperature: float = 1.0,
    chunk_size: int = 256,
) -> torch.Tensor:
    """Mean per-token KL(p_teacher || p_student) at ``temperature`` (times T^2), from final hidden states.

    Positions are processed ``chunk_size`` at a time, and each chunk's gradient is taken at once into the
    student's hidden states, so only one chunk's ``[chunk, vocab]`` logits and probabilities are alive; the
    returned loss is detached when ``student_hidden`` needs a gradient, which has then already been propagated
    (call ``.backward()`` on nothing further).
    """
    s = student_hidden.reshape(-1, student_hidden.shape[-1])
    t = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).detach()
    n = s.shape[0]
    if n == 0:
        return student_hidden.new_zeros(())
    train = s.requires_grad
    s_leaf = s.detach().requires_grad_(train)
    total = torch.zeros((), dtype=torch.float32, device=s.device)
    for begin in range(0, n, chunk_size):
        end = min(n, begin + chunk_size)
        with torch.enable_grad() if train else torch.no_grad():
            log_p_s = F.log_softmax(student_head(s_leaf[begin:end]).float() / temperature, -1)
            with torch.no_grad():
                log_p_t = F.log_softmax(teacher_head(t[begin:end]).float() / temperature, -1)
            chunk = F.kl_div(log_p_s, log_p_t, log_target=True, reduction="sum") * (temperature**2) / n
            if train:
                chunk.backward()
        total += chunk.detach()
    if train:
        s.backward(s_leaf.grad)
    return total


def _load_sequences(data) -> list[list[int]]:
    if isinstance(data, (str, os.PathLike)):
        with open(data, encoding="utf-8") as f:
            data = [json.loads(line) for line in f if line.strip()]
    sequences = []
    for item in data:
        ids = item["input_ids"] if isinstance(item, dict) else item
        sequences.append([int(i) for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)])
    return sequences


def _blocks(sequences: Sequence[list[int]], seq_len: int) -> torch.Tensor:
    """Concatenate and cut into blocks of seq_len tokens (the remainder dropped), as LLM-QAT does."""
    flat = [t for seq in sequences for t in seq]
    count = len(flat) // seq_len
    if count == 0:
        raise ValueError(f"distill: the data holds {len(flat)} tokens, fewer than one block of seq_len={seq_len}")
    return torch.tensor(flat[: count * seq_len], dtype=torch.long).view(count, seq_len)


def distill(
    student: nn.Module,
    teacher: nn.Module,
    data: Union[str, os.PathLike, Iterable],
    seq_len: int = 512,
    batch_size: int = 1,
    epochs: int = 1,
    max_steps: Optional[int] = None,
    lr: float = 2e-5,
    scale_lr: Optional[float] = None,
    weight_decay: float = 0.0,
    warmup_steps: int = 0,
    temperature: float = 1.0,
    chunk_size: int = 256,
    max_grad_norm: Optional[float] = 1.0,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Logit distillation of ``student`` (e.g. from :func:`bnbx.qat.prepare`) from ``teacher`` on ``data``.

    ``data``: a jsonl path or a list of ``{"input_ids": ...}`` / token-id lists (what :func:`generate_data`
    returns); sequences are packed into blocks of ``seq_len``. AdamW with cosine decay (``warmup_steps`` linear
    warm-up), gradient clipping at ``max_grad_norm``; LSQ scales (``*.weight_scale``) use ``scale_lr`` if given;
    loss :func:`kd_loss` (no ground-truth term). Both models must be Hugging Face causal LMs
    (``get_decoder()`` and ``get_output_embeddings()``). Returns the loss of
    every step.

    Choosing ``scale_lr``: an Adam step moves a parameter by about the learning rate whatever its gradient, and
    an LSQ scale is about absmax / qmax, so one learning rate is a very different relative step at different
    widths. 1e-3 worked for 4-bit weights of SmolLM2-135M (``benchmarks/qat_smollm2.py``); scale it by
    7 / qmax for other widths (about 5.5e-5 at 8 bits), or the scales move by more than their own size.
    """
    blocks = _blocks(_load_sequences(data), seq_len)
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(blocks) / batch_size)
    total = steps_per_epoch * epochs if max_steps is None else max_steps
    named = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    # learned quantizer scales (LSQ's weight_scale) may take their own learning rate, without weight decay
    scales = [p for n, p in named if n.endswith("weight_scale")]
    others = [p for n, p in named if not n.endswith("weight_scale")]
    groups = [{"params": others}]
    if scales:
        groups.append({"params": scales, "lr": lr if scale_lr is None else scale_lr, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)

    def schedule(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress_ = (step - warmup_steps) / max(1, total - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress_, 1.0)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    device = next(student.parameters()).device
    s_decoder, s_head = student.get_decoder(), student.get_output_embeddings()
    t_decoder, t_head = teacher.get_decoder(), teacher.get_output_embeddings()
    teacher.eval()
    student.train()
    losses: list[float] = []
    bar = tqdm(total=total, desc="distill", disable=not progress)
    step = 0
    while step < total:
        order = torch.randperm(len(blocks), generator=generator)
        for begin in range(0, len(blocks), batch_size):
            if step >= total:
                break
            ids = blocks[order[begin : begin + batch_size]].to(device)
            with torch.no_grad():
                t_hidden = t_decoder(input_ids=ids, use_cache=False).last_hidden_state
            s_hidden = s_decoder(input_ids=ids, use_cache=False).last_hidden_state
            loss = kd_loss(s_hidden, t_hidden, s_head, t_head, temperature, chunk_size)
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss))
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            bar.update(1)
            step += 1
    bar.close()
    return losses
