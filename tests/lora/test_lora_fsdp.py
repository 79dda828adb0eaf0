"""FSDP2 (fully_shard) over a QLoRA model with quant_storage=torch.bfloat16: 2 processes with gloo on the
CPU train a few steps and see the same losses as one process; the packed weights are sharded, not cast."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("needs torch.distributed with gloo", allow_module_level=True)

import bnbx  # noqa: E402
import bnbx.lora as lora  # noqa: E402
from tiny_llama import quantize_linears, token_batches  # noqa: E402

STEPS, BATCH, LENGTH = 4, 8, 32


class Block(nn.Module):
    def __init__(self, hidden, intermediate):
        super().__init__()
        self.norm = nn.RMSNorm(hidden)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, h):
        return h + self.down_proj(F.gelu(self.up_proj(self.norm(h))))


class TinyLM(nn.Module):
    """A small next-byte model without attention (transformers is slow to import in every process)."""

    def __init__(self, hidden=64, intermediate=176, layers=3):
        super().__init__()
        self.embed = nn.Embedding(256, hidden)
        self.layers = nn.ModuleList(Block(hidden, intermediate) for _ in range(layers))
        self.norm = nn.RMSNorm(hidden)
        self.lm_head = nn.Linear(hidden, 256, bias=False)

    def forward(self, input_ids, labels):
        h = self.embed(input_ids)
        for layer in self.layers:
            h = layer(h)
        logits = self.lm_head(self.norm(h)).float()
        return F.cross_entropy(logits[:, :-1].reshape(-1, 256), labels[:, 1:].reshape(-1))


def build():
    torch.manual_seed(0)
    model = TinyLM()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.15)
    model = quantize_linears(model.to(torch.bfloat16), compute_dtype=torch.bfloat16, quant_storage=torch.bfloat16)
    torch.manual_seed(0)
    return lora.add_lora(model, "all-linear", r=8, lora_alpha=16, dtype=torch.float32)


def train(model, rank=0, world=1):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for batch in token_batches(STEPS, batch=BATCH, length=LENGTH):
        part = batch.chunk(world)[rank]
        loss = model(input_ids=part, labels=part)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach().float())
    return torch.stack(losses)


def worker(rank, world, port, out_dir):
    from torch.distributed.fsdp import fully_shard

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = build()
        packed = {n: p.detach().clone() for n, p in model.named_parameters() if isinstance(p, bnbx.nn.Params4bit)}
        for layer in model.layers:
            fully_shard(layer)
        fully_shard(model)
        shards = {n: p for n, p in model.named_parameters() if n in packed}
        sharded = all(p.to_local().shape[0] == -(-packed[n].shape[0] // world) for n, p in shards.items())
        losses = train(model, rank, world)
        dist.all_reduce(losses)
        losses /= world
        unchanged = all(torch.equal(p.full_tensor().view(torch.uint8), packed[n].view(torch.uint8))
                        for n, p in shards.items())
        torch.save({"losses": losses, "sharded": sharded, "unchanged": unchanged, "count": len(shards)},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_fully_shard_matches_one_process(tmp_path):
    import torch.multiprocessing as mp

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = train(build())
    finally:
        torch.set_num_threads(threads)
    mp.spawn(worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for result in results:
        assert result["count"] == 3 * 2 and result["sharded"] and result["unchanged"]
        torch.testing.assert_close(result["losses"], single, rtol=2e-3, atol=0)
    assert single[-1] < single[0]  # it did train
