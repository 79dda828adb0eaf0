"""One QLoRA training step on the CPU: bnbx against bf16 LoRA and bitsandbytes QLoRA, in one table.

    python benchmarks/bench_qlora.py [--hidden 1024] [--intermediate 2816] [--layers 2] [--tokens 512]
                                     [--repeat 5] [--threads N] [--rounds 1] [--interleave]

The model is a Llama-style stack built here (transformers' LlamaConfig, random weights, vocab 32000, no
downloads); every linear layer but lm_head gets the same LoRA adapter (bnbx.lora, r=16, alpha=32, fp32
adapters), so the first five rows differ only in how the frozen base weights are stored and multiplied:
- fp32 / bf16 LoRA: dense nn.Linear bases.
- bnbx QLoRA: bnbx.nn.Linear4bit, NF4, bf16 compute, without / with double quantization.
- bitsandbytes QLoRA: bitsandbytes.nn.Linear4bit with the same settings (NF4 + double quant, bf16 compute).
- bitsandbytes+peft QLoRA: the same bitsandbytes layers with peft's LoRA (get_peft_model, r=16, alpha=32,
  "all-linear", fp32 adapters as peft makes them for a bf16 model): what a bitsandbytes user runs.
Each row runs in a fresh process (so memory figures do not mix). Columns:
- B/param: bytes of the base linear weights as stored (packed codes + absmax + nested statistics + code
  tables) per weight; the same quantity for the dense rows (4 or 2).
- model MB: resident memory the built model adds to the process (RSS after - before building it).
- step ms: median wall time (time.perf_counter) of forward + backward + AdamW step over --repeat steps,
  after one warm-up step, with gradient checkpointing off, --tokens tokens per step.
- step peak MB: peak resident memory during those steps above the resident memory before them (Linux
  VmHWM, reset through /proc/self/clear_refs).
- vs bnb: bitsandbytes QLoRA's step time (bnbx.lora adapters) / this row's (above 1: faster than bitsandbytes);
  with --rounds N, the median of the N rounds' ratios. vs peft: the same against bitsandbytes+peft, the step a
  bitsandbytes user runs.
--rounds N runs every variant N times, the rounds interleaved, and reports the median step time: on a machine
whose speed drifts (a VM), one run per variant can put minutes of drift between two rows. --interleave builds
every row's model in this one process and alternates their steps (--rounds rounds of --repeat steps each), so
every ratio compares steps seconds apart; the memory columns then read n/a.
On a shared machine the times move with the load; the header prints the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

VARIANTS = ["fp32 LoRA", "bf16 LoRA", "bnbx QLoRA nf4", "bnbx QLoRA nf4+dq", "bitsandbytes QLoRA nf4+dq",
            "bitsandbytes+peft QLoRA nf4+dq"]


def _rss_kb(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def _weight_bytes(module) -> tuple[int, int]:
    """(stored bytes, logical weights) of one base linear layer."""
    import torch

    weight = module.weight
    state = getattr(weight, "quant_state", None)
    if state is None:
        return weight.numel() * weight.element_size(), weight.numel()
    tensors = [weight.data, state.absmax, state.code]
    if getattr(state, "state2", None) is not None:
        tensors += [state.state2.absmax, state.state2.code, state.offset]
    stored = sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
    return stored, int(torch.Size(state.shape).numel())


def build_variant(variant: str, args: argparse.Namespace):
    """The model of one row, ready to train: (step function, stored bytes, logical weights)."""
    import torch
    from torch import nn
    from transformers import LlamaConfig, LlamaForCausalLM

    import bnbx
    import bnbx.lora as lora

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         num_key_value_heads=args.hidden // 64, tie_word_embeddings=False, use_cache=False)
    dtype = torch.float32 if variant.startswith("fp32") else torch.bfloat16
    model = LlamaForCausalLM(config).to(dtype)
    double = variant.endswith("+dq")
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or name.endswith("lm_head") or "QLoRA" not in variant:
            continue
        if variant.startswith("bitsandbytes"):
            import bitsandbytes as bnb

            new = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                    compute_dtype=torch.bfloat16, compress_statistics=double, quant_type="nf4")
            new.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False, compress_statistics=double,
                                           quant_type="nf4", module=new)
            new = new.to("cpu")  # bitsandbytes quantizes on the device move
        else:
            new = bnbx.nn.Linear4bit.from_linear(module, compute_dtype=torch.bfloat16, compress_statistics=double,
                                                 quant_type="nf4")
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    stored = logical = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not name.endswith("lm_head"):
            s, n = _weight_bytes(module)
            stored, logical = stored + s, logical + n
    if "peft" in variant:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))
        adapter_dtypes = {p.dtype for n, p in model.named_parameters() if "lora_" in n}
        assert adapter_dtypes == {torch.float32}, adapter_dtypes
    else:
        lora.add_lora(model, "all-linear", r=16, lora_alpha=32, dtype=torch.float32)
    model.train()
    ids = torch.randint(0, 32000, (1, args.tokens))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: optimizer state, first-call allocations
    return step, stored, logical


def run_variant(variant: str, args: argparse.Namespace) -> dict:
    """One row in this (fresh) process: its memory, and the median of --repeat steps."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    before = _rss_kb()
    step, stored, logical = build_variant(variant, args)
    model_kb = _rss_kb() - before
    base = _rss_kb()
    _reset_peak()
    step_ms = median_step_ms(step, args.repeat)
    peak = _rss_kb("VmHWM") - base
    return {"variant": variant, "bytes_per_param": stored / logical, "model_mb": model_kb / 1024,
            "step_ms": step_ms, "peak_mb": peak / 1024, "params": logical}


def median_step_ms(step, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def run_interleaved(variants: list[str], args: argparse.Namespace) -> dict[str, list[dict]]:
    """Every row's model in this one process, their steps alternating: --rounds rounds of --repeat steps each, so
    every row sees the same stretch of the machine's drift. Returns each row's runs as run_variant's results, with
    the memory columns nan (they need a process each)."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    built = {variant: build_variant(variant, args) for variant in variants}
    runs: dict[str, list[dict]] = {variant: [] for variant in variants}
    for _ in range(args.rounds):
        for variant, (step, stored, logical) in built.items():
            runs[variant].append({"variant": variant, "bytes_per_param": stored / logical, "model_mb": float("nan"),
                                  "step_ms": median_step_ms(step, args.repeat), "peak_mb": float("nan"),
                                  "params": logical})
    return runs


def run_in_processes(variants: list[str], args: argparse.Namespace) -> dict[str, list[dict]]:
    """Each row's --rounds runs, each in a fresh process (so memory figures do not mix), the rounds interleaved:
    each row's runs spread over the same stretch of time."""
    runs: dict[str, list[dict]] = {variant: [] for variant in variants}
    for _ in range(args.rounds):
        for variant in variants:
            cmd = [sys.executable, __file__, "--variant", variant] + [
                f"--{k}={v}" for k, v in vars(args).items() if k not in ("variant", "rounds", "interleave")]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode:
                print(f"{variant}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
                continue
            runs[variant].append(json.loads(done.stdout.strip().splitlines()[-1]))
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every variant this many times, interleaved; step ms is the median of the runs")
    parser.add_argument("--interleave", action="store_true",
                        help="all rows in one process, their steps alternating round by round (timing only)")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    if args.variant:
        print(json.dumps(run_variant(args.variant, args)))
        return

    import torch

    import bnbx

    try:
        import importlib.metadata as metadata

        bnb_version = metadata.version("bitsandbytes")
    except Exception:
        bnb_version = None
    load_before = os.getloadavg()[0]
    variants = [v for v in VARIANTS if bnb_version is not None or not v.startswith("bitsandbytes")]
    runs = run_interleaved(variants, args) if args.interleave else run_in_processes(variants, args)
    rows = []
    for variant in variants:
        if not runs[variant]:
            continue
        row = dict(runs[variant][0])
        row["step_ms"] = statistics.median(r["step_ms"] for r in runs[variant])
        row["round_ms"] = [r["step_ms"] for r in runs[variant]]
        rows.append(row)
    peers = {name: next((r for r in rows if r["variant"] == name), None)
             for name in ("bitsandbytes QLoRA nf4+dq", "bitsandbytes+peft QLoRA nf4+dq")}
    print(f"bnbx {bnbx.__version__}, torch {torch.__version__}, bitsandbytes {bnb_version or 'not installed'}; "
          f"cpu threads {args.threads or torch.get_num_threads()}, bnbx kernels {bnbx.cpu_capability()}; "
          f"Llama hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, "
          f"{rows[0]['params'] / 1e6 if rows else 0:.1f}M base linear weights, {args.tokens} tokens per step, "
          f"LoRA r=16 on all linear layers; {args.rounds} round(s){' in one process' if args.interleave else ''}; "
          f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    widths = (30, 7, 8, 8, 12, 6, 7)
    names = ("variant", "B/param", "model MB", "step ms", "step peak MB", "vs bnb", "vs peft")
    print("  ".join(n.ljust(w) if i == 0 else n.rjust(w) for i, (n, w) in enumerate(zip(names, widths))))
    print("  ".join("-" * w for w in widths))

    def ratio(peer, row) -> str:
        if peer is None or len(peer["round_ms"]) != len(row["round_ms"]):
            return "n/a"
        # the median of the rounds' ratios: each ratio compares two runs made minutes apart at most
        return f"{statistics.median(p / o for p, o in zip(peer['round_ms'], row['round_ms'])):.2f}x"

    for r in rows:
        vs_bnb, vs_peft = (ratio(peer, r) for peer in peers.values())
        model_mb, peak_mb = (f"{r[k]:.1f}" if r[k] == r[k] else "n/a" for k in ("model_mb", "peak_mb"))  # nan: n/a
        print(f"{r['variant']:<30}  {r['bytes_per_param']:>7.4f}  {model_mb:>8}  {r['step_ms']:>8.1f}  "
              f"{peak_mb:>12}  {vs_bnb:>6}  {vs_peft:>7}")


if __name__ == "__main__":
    main()
