"""A LoRA adapter's forward + backward on the CPU: bnbx's fused op against the same products in plain torch.

    python benchmarks/bench_lora.py [--shapes 1024x1024,1024x2816,2816x1024,4096x11008] [--m 1,512] [--r 16]
                                    [--threads N] [--repeat 30]

For bf16 activations x [M, K] and the base layer's output [M, N], fp32 adapters A [r, K] and B [N, r] (as peft
makes them for a bf16 model; scaling 2): the adapted output ``base + (scaling * x @ A^T) @ B^T`` in bf16 and the
gradients of x, A and B for a bf16 gradient of the output. Rows:
- bnbx: ``torch.ops.bnbx.lora_forward`` (what ``bnbx.lora.LoraLinear`` runs) and its registered backward.
- torch: the products as peft's LoRA layer computes them: x cast to fp32, ``lora_B(lora_A(x)) * scaling`` added
  to the base output (fp32 by type promotion) and cast back to bf16, autograd's backward.
Columns: ms (median wall time of forward + backward, time.perf_counter), vs torch (torch ms / bnbx ms, the same run),
the same for the forward alone under no_grad (fwd: inference, e.g. one token of generation with an unmerged
adapter), GB/s (the least traffic a forward + backward needs over bnbx's time: 3 M (K + N) bf16 activations (x,
the base output and the output's gradient read, the output and x's gradient written, x and the gradient read
again) and 4 r (K + N) fp32 adapter values (A and B read twice, their gradients written)) and % copy (that over
this machine's copy bandwidth, measured in the same run).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import bnbx
from bench_linear4bit import copy_bandwidth_gbs, cpu_description, median_ms


def bnbx_step(x, base, A, B, grad, scaling):
    out = torch.ops.bnbx.lora_forward(x, base, A, B, scaling)
    return torch.autograd.grad(out, (x, A, B), grad)


def torch_forward(x, base, A, B, scaling):
    return (base + F.linear(F.linear(x.to(A.dtype), A), B) * scaling).to(base.dtype)


def torch_step(x, base, A, B, grad, scaling):
    return torch.autograd.grad(torch_forward(x, base, A, B, scaling), (x, A, B), grad)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="1024x1024,1024x2816,2816x1024,4096x11008", help="KxN, comma-separated")
    parser.add_argument("--m", default="1,512")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    copy_gbs = copy_bandwidth_gbs(1 << 24, args.repeat)
    name, flags = cpu_description()
    print(f"{name}; {' '.join(flags)}; bnbx {bnbx.__version__} kernels {bnbx.cpu_capability()}, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; LoRA r={args.r}, bf16 activations, fp32 "
          f"adapters; copy bandwidth {copy_gbs:.1f} GB/s")
    header = (f"{'K':>5} {'N':>6} {'M':>5} {'bnbx ms':>8} {'torch ms':>9} {'vs torch':>8} {'fwd bnbx':>8} "
              f"{'fwd torch':>9} {'vs torch':>8} {'GB/s':>6} {'% copy':>6}")
    print(header)
    print("-" * len(header))
    for shape in args.shapes.split(","):
        K, N = (int(v) for v in shape.lower().split("x"))
        A = (torch.randn(args.r, K) / K**0.5).requires_grad_()
        B = torch.randn(N, args.r).requires_grad_()
        for M in (int(v) for v in args.m.split(",")):
            x = torch.randn(M, K, dtype=torch.bfloat16, requires_grad=True)
            base = torch.randn(M, N, dtype=torch.bfloat16)
            grad = torch.randn(M, N, dtype=torch.bfloat16)
            ms = median_ms([lambda: bnbx_step(x, base, A, B, grad, 2.0)], args.repeat)
            torch_ms = median_ms([lambda: torch_step(x, base, A, B, grad, 2.0)], args.repeat)
            with torch.no_grad():
                fwd = median_ms([lambda: torch.ops.bnbx.lora_forward(x, base, A, B, 2.0)], args.repeat)
                torch_fwd = median_ms([lambda: torch_forward(x, base, A, B, 2.0)], args.repeat)
            gbs = (3 * M * (K + N) * 2 + 4 * args.r * (K + N) * 4) / (ms * 1e6)
            print(f"{K:>5} {N:>6} {M:>5} {ms:>8.3f} {torch_ms:>9.3f} {torch_ms / ms:>7.2f}x {fwd:>8.3f} "
                  f"{torch_fwd:>9.3f} {torch_fwd / fwd:>7.2f}x {gbs:>6.1f} {100 * gbs / copy_gbs:>5.0f}%")


if __name__ == "__main__":
    main()
