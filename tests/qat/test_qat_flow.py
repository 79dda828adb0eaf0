"""bnbx.qat modules and flow on a tiny random Llama: prepare, KV-cache fake quantization, exact convert,
data-free generation and chunked distillation."""

from __future__ import annotations

import copy
import inspect
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import dtype_id

from bnbx.qat import (
    FakeQuantLinear,
    KVFakeQuant,
    QATConfig,
    QuantizedLinear,
    convert,
    distill,
    fake_quantize,
    generate_data,
    kd_loss,
    prepare,
)

transformers = pytest.importorskip("transformers")

CACHE_ARG = (
    "cache" if "cache" in inspect.signature(transformers.LlamaForCausalLM.forward).parameters else "past_key_values"
)


def tiny_llama(seed: int = 0, vocab: int = 96):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attn_implementation="sdpa",
    )
    return transformers.LlamaForCausalLM(config).eval()


class TinyTokenizer:
    all_special_ids = [0, 1, 2]
    eos_token_id = 2

    def decode(self, tokens, skip_special_tokens=True):
        return " ".join(str(t) for t in tokens if not (skip_special_tokens and t in self.all_special_ids))


def test_prepare_swaps_projections_only():
    model = prepare(tiny_llama(), QATConfig(w_bits=4, a_bits=8))
    names = {name for name, m in model.named_modules() if isinstance(m, FakeQuantLinear)}
    assert names == {
        f"model.layers.{i}.{p}"
        for i in range(2)
        for p in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
    }
    assert type(model.lm_head) is torch.nn.Linear
    assert type(model.model.embed_tokens) is torch.nn.Embedding
    assert "weight=int4 channel" in repr(model.model.layers[0].mlp.up_proj)


def test_prepare_skip_and_modules():
    model = prepare(tiny_llama(), QATConfig(skip=("model.layers.1",), modules=("model.layers",)))
    assert isinstance(model.model.layers[0].mlp.up_proj, FakeQuantLinear)
    assert type(model.model.layers[1].mlp.up_proj) is torch.nn.Linear
    with pytest.raises(ValueError, match="config.skip names modules that do not exist.*model.layers.7"):
        prepare(tiny_llama(), QATConfig(skip=("model.layers.7",)))
    with pytest.raises(ValueError, match="config.modules names modules that do not exist.*decoder"):
        prepare(tiny_llama(), QATConfig(modules=("decoder",)))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(w_bits=1), "w_bits must be from 2 to 8"),
        (dict(a_bits=9), "a_bits must be from 2 to 8"),
        (dict(kv_bits=12), "kv_bits must be from 2 to 8"),
        (dict(weight_granularity="row"), "weight_granularity must be one of"),
        (dict(method="adaround"), "method must be one of"),
        (dict(weight_dtype="nf4", method="lsq"), "method must be 'minmax'"),
        (dict(group_size=0), "group_size must be a positive integer"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QATConfig(**kwargs)


def test_group_size_must_divide_in_features():
    with pytest.raises(ValueError, match="group_size 24 does not divide in_features"):
        prepare(tiny_llama(), QATConfig(weight_granularity="group", group_size=24))


def test_fake_quant_linear_forward():
    torch.manual_seed(1)
    linear = torch.nn.Linear(32, 16)
    layer = FakeQuantLinear.from_linear(linear, QATConfig(w_bits=4, a_bits=8))
    x = torch.randn(2, 5, 32)
    expected = F.linear(
        fake_quantize(x, 8, True, "token"), fake_quantize(linear.weight, 4, True, "channel"), linear.bias
    )
    assert torch.equal(layer(x), expected)
    assert layer.weight is linear.weight  # shared, not copied


def test_kv_fake_quant_per_token_and_head():
    k = torch.randn(2, 3, 5, 8)
    per_token = KVFakeQuant(4, "token")(k)
    expected = fake_quantize(k.transpose(1, 2).reshape(2, 5, 24), 4, True, "token").reshape(2, 5, 3, 8).transpose(1, 2)
    assert torch.equal(per_token, expected)
    assert torch.equal(KVFakeQuant(4, "head")(k), fake_quantize(k, 4, True, "token"))


@pytest.mark.parametrize("granularity", ["token", "head"])
def test_kv_quantization_reaches_attention_and_matches_cache(granularity):
    teacher = tiny_llama()
    student = prepare(copy.deepcopy(teacher), QATConfig(w_bits=16, a_bits=16, kv_bits=3, kv_granularity=granularity))
    ids = torch.randint(3, 96, (2, 12))
    with torch.no_grad():
        full = student(ids).logits
        assert not torch.allclose(full, teacher(ids).logits, atol=1e-4)  # K/V are quantized
        # the same logits token by token through the KV cache: cached tokens were quantized the same way
        out = student(ids[:, :8], use_cache=True)
        cache = out.past_key_values
        steps = [out.logits]
        for t in range(8, 12):
            out = student(ids[:, t : t + 1], **{CACHE_ARG: cache}, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-5)


def test_kv_needs_llama_attention():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="kv_bits < 16 but the model has no Llama-style attention"):
        prepare(model, QATConfig(kv_bits=8))


CONVERT_CONFIGS = [
    QATConfig(w_bits=8, a_bits=8),
    QATConfig(w_bits=4, a_bits=8, kv_bits=4),
    QATConfig(w_bits=4, a_bits=16, weight_granularity="group", group_size=16),
    QATConfig(w_bits=3, a_bits=16, weight_granularity="tensor", range="full"),
    QATConfig(w_bits=4, a_bits=8, method="lsq"),
    QATConfig(w_bits=16, a_bits=16, weight_dtype="nf4"),
    QATConfig(w_bits=16, a_bits=8, weight_dtype="fp4", group_size=32),
]


@pytest.mark.parametrize(
    "config", CONVERT_CONFIGS, ids=lambda c: f"{c.weight_dtype}{c.w_bits}-{c.weight_granularity}-{c.method}"
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_convert_is_exact(config, dtype):
    student = prepare(tiny_llama().to(dtype), config)
    if config.method == "lsq":  # learned scales move away from MinMax; convert must store the learned ones
        with torch.no_grad():
            for m in student.modules():
                if isinstance(m, FakeQuantLinear):
                    m.weight_scale.mul_(0.8 + 0.4 * torch.rand_like(m.weight_scale))
    fake_weights = {
        n: m.quantized_weight().detach() for n, m in student.named_modules() if isinstance(m, FakeQuantLinear)
    }
    ids = torch.randint(3, 96, (2, 10))
    with torch.no_grad():
        before = student(ids).logits
    convert(student)
    for name, weight in fake_weights.items():
        layer = student.get_submodule(name)
        assert isinstance(layer, QuantizedLinear)
        assert torch.equal(layer.dequantized_weight(), weight), name
        if config.weight_dtype == "int":
            assert layer.weight_q.dtype == torch.int8
            qmax = 2 ** (config.w_bits - 1) - 1
            assert int(layer.weight_q.abs().max()) <= qmax + (1 if config.range == "full" else 0)
    with torch.no_grad():
        assert torch.equal(student(ids).logits, before)


def test_convert_needs_prepared_model():
    with pytest.raises(ValueError, match="no FakeQuantLinear layers"):
        convert(tiny_llama())


def test_lsq_scale_learns():
    student = prepare(tiny_llama(), QATConfig(w_bits=4, a_bits=16, method="lsq"))
    layer = student.model.layers[0].mlp.up_proj
    ids = torch.randint(3, 96, (2, 10))
    student(ids).logits.square().mean().backward()
    assert layer.weight_scale.grad is not None and layer.weight_scale.grad.abs().sum() > 0
    assert layer.weight.grad is not None


# --- data-free distillation -------------------------------------------------------------------------------------


def test_generate_data_greedy_prefix_and_resume(tmp_path):
    teacher = tiny_llama()
    path = tmp_path / "gen.jsonl"
    first = generate_data(teacher, TinyTokenizer(), 3, 12, batch_size=2, path=path, progress=False, top_k=10)
    assert len(path.read_text().splitlines()) == 3
    data = generate_data(teacher, TinyTokenizer(), 5, 12, batch_size=2, path=path, progress=False, top_k=10)
    assert data[:3] == first and len(data) == 5
    assert [json.loads(line) for line in path.read_text().splitlines()] == data
    for i, sample in enumerate(data):
        ids = sample["input_ids"]
        assert 2 <= len(ids) <= 12 and ids[0] not in TinyTokenizer.all_special_ids
        assert 2 not in ids[:-1]  # stops at the end-of-sequence token
        prefix = 3 + i % 3
        with torch.no_grad():
            logits = teacher(torch.tensor([ids])).logits[0]
        greedy = logits.argmax(-1)
        for position in range(1, min(prefix, len(ids))):
            assert ids[position] == int(greedy[position - 1]), (i, position)


def test_generate_data_bad_input():
    with pytest.raises(ValueError, match="greedy_prefix"):
        generate_data(tiny_llama(), TinyTokenizer(), 2, 8, greedy_prefix=(5, 3))
    with pytest.raises(ValueError, match="seq_len"):
        generate_data(tiny_llama(), TinyTokenizer(), 2, 1)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kd_loss_chunked_equals_full(temperature):
    torch.manual_seed(3)
    head_s, head_t = torch.nn.Linear(16, 50, bias=False), torch.nn.Linear(16, 50, bias=False)
    hs = torch.randn(2, 7, 16, requires_grad=True)
    ht = torch.randn(2, 7, 16)
    loss = kd_loss(hs * 1.0, ht, head_s, head_t, temperature, chunk_size=3)
    grad_chunked, head_grad = hs.grad.clone(), head_s.weight.grad.clone()
    hs.grad, head_s.weight.grad = None, None
    log_s = F.log_softmax(head_s(hs) / temperature, -1)
    p_t = F.softmax(head_t(ht) / temperature, -1)
    full = (p_t * (p_t.log() - log_s)).sum(-1).mean() * temperature**2
    full.backward()
    torch.testing.assert_close(loss, full.detach())
    torch.testing.assert_close(grad_chunked, hs.grad)
    torch.testing.assert_close(head_grad, head_s.weight.grad)


def test_kd_loss_gradcheck():
    torch.manual_seed(4)
    head_s = torch.nn.Linear(4, 9, bias=False).double()
    head_t = torch.nn.Linear(4, 9, bias=False).double()
    ht = torch.randn(5, 4, dtype=torch.float64)

    def fn(hs):
        # the per-token KL that kd_loss computes in chunks, as one smooth function of hs
        log_s = F.log_softmax(head_s(hs), -1)
        log_t = F.log_softmax(head_t(ht), -1)
        return F.kl_div(log_s, log_t, log_target=True, reduction="sum") / hs.shape[0]

    hs = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fn, (hs,))
    torch.testing.assert_close(
        kd_loss(hs.detach(), ht, head_s, head_t, chunk_size=2), fn(hs.detach()).float(), rtol=1e-5, atol=1e-6
    )


def _kd_on(student, teacher, ids):
    with torch.no_grad():
        hs = student.get_decoder()(input_ids=ids).last_hidden_state
        ht = teacher.get_decoder()(input_ids=ids).last_hidden_state
        return float(kd_loss(hs, ht, student.get_output_embeddings(), teacher.get_output_embeddings()))


def test_distill_reduces_kd_loss():
    teacher = tiny_llama(seed=0)
    with torch.no_grad():  # sharper next-token distributions than the near-uniform random init
        teacher.lm_head.weight.mul_(8)
    student = prepare(copy.deepcopy(teacher), QATConfig(w_bits=2, a_bits=8, kv_bits=4))
    data = [{"input_ids": torch.randint(3, 96, (32,)).tolist()} for _ in range(4)]
    ids = torch.tensor([d["input_ids"] for d in data])
    before_params = [p.detach().clone() for p in student.parameters()]
    before = _kd_on(student, teacher, ids)
    losses = distill(
        student, teacher, data, seq_len=32, batch_size=2, max_steps=12, lr=3e-4, progress=False, chunk_size=7
    )
    after = _kd_on(student, teacher, ids)
    assert len(losses) == 12
    assert after < 0.6 * before, (before, after)
    assert any(not torch.equal(a, b) for a, b in zip(before_params, student.parameters()))
    for p in teacher.parameters():
        assert p.grad is None
