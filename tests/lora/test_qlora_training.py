"""QLoRA end to end: a tiny Llama with an NF4 double-quantized base, LoRA r=8 on every linear layer,
50 AdamW steps on a short text with gradient checkpointing."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import bnbx  # noqa: E402
import bnbx.lora as lora  # noqa: E402
from tiny_llama import quantize_linears, tiny_llama, token_batches  # noqa: E402


@pytest.fixture
def one_thread():
    # a model this small gains nothing from threads, and spinning threads crawl on a busy machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def qlora_model(seed=0):
    model = quantize_linears(tiny_llama(hidden=64, layers=2, intermediate=176, seed=seed, init=0.15),
                             compute_dtype=torch.bfloat16)
    bnbx.prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                         gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(seed)
    return lora.add_lora(model, "all-linear", r=8, lora_alpha=16)


def train(model, steps, seed=0):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for batch in token_batches(steps, length=48, seed=seed):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_qlora_training(one_thread):
    model = qlora_model()
    linear = [m for m in model.modules() if isinstance(m, bnbx.nn.Linear4bit)]
    assert len(linear) == 2 * 7 and all(m.weight.quant_type == "nf4" and m.weight.compress_statistics
                                        for m in linear)
    adapted = dict(lora.lora_layers(model))
    assert len(adapted) == 2 * 7 and "lm_head" not in adapted and all(m.config.r == 8 for m in adapted.values())
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}

    # gradient checkpointing: each decoder layer's attention runs twice per step (again when backward
    # recomputes the layer; torch stops recomputing once it has every saved tensor it needs)
    calls = []
    hook = model.model.layers[0].self_attn.register_forward_hook(lambda *args: calls.append(1))
    losses = train(model, 50)
    hook.remove()
    assert len(calls) == 100

    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert first > 5.0  # about ln(256): the random base knows nothing
    assert last < 0.6 * first, losses

    # only adapter parameters changed; packed codes and statistics are bit-identical
    after = model.state_dict()
    assert after.keys() == before.keys()
    changed = {k for k in before if not torch.equal(before[k].view(torch.uint8) if before[k].dtype == torch.bfloat16
                                                    else before[k], after[k].view(torch.uint8)
                                                    if after[k].dtype == torch.bfloat16 else after[k])}
    assert changed == {k for k in before if ".lora_A." in k or ".lora_B." in k}
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)

    # deterministic: the same seed gives the same losses and adapters, bit for bit
    again = qlora_model()
    assert train(again, 6) == losses[:6]
    replay = qlora_model()
    train(replay, 6)
    assert all(torch.equal(a, b) for a, b in zip(lora.lora_state_dict(again).values(),
                                                 lora.lora_state_dict(replay).values()))

    # the trained adapters survive the trip to a dense model
    batch = next(token_batches(1, seed=99))
    model.eval()
    with torch.no_grad():
        reference = model(input_ids=batch, labels=batch).loss.item()
        dense = lora.merge_and_unload(model, dtype=torch.float32)
        assert not any(isinstance(m, bnbx.nn.Linear4bit) for m in dense.modules())
        assert dense(input_ids=batch, labels=batch).loss.item() == pytest.approx(reference, rel=0.02)
