"""``python -m bnbx``: the ``bnbx`` command (see :mod:`bnbx.cli`), and the ``env`` report and ``formats``
table (size and error of every storage format on synthetic LLaMA-shaped weights) it uses."""

from __future__ import annotations

import platform
import sys
import time
from typing import Callable

import torch

import bnbx
from bnbx import _library
from bnbx import functional as F


def env_report() -> str:
    """Build, instruction-set, CUDA and version facts, one per line."""
    cuda_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    lines = [
        f"bnbx                {bnbx.__version__}",
        f"python              {platform.python_version()} ({sys.executable})",
        f"torch               {torch.__version__} (CUDA {torch.version.cuda or 'none: a CPU build'})",
        f"bnbx CPU kernels    {_library.cpu_capability()} (override with BNBX_CPU_CAPABILITY=scalar|avx2|avx512)",
        "bnbx CUDA kernels   "
        + (
            "built for sm_" + _library.cuda_architectures().replace(",", ", sm_")
            if _library.cuda_built()
            else "not built (CPU-only build)"
        ),
        f"GPUs visible        {cuda_devices}" + (f" ({torch.cuda.get_device_name(0)})" if cuda_devices else ""),
        f"CPU threads         {torch.get_num_threads()}",
    ]
    if not _library.cuda_built():
        lines.append(f"note                to build the CUDA kernels: {_library.REBUILD_HINT}")
    return "\n".join(lines)


def demo_model(seed: int = 0) -> dict[str, torch.Tensor]:
    """The built-in model: one LLaMA-shaped transformer block (hidden 512, MLP 1376) in bf16, with
    seeded weights of std 0.02 and a few large outlier input columns, as trained LLM weights have."""
    generator = torch.Generator().manual_seed(seed)
    shapes = {
        "attn.q_proj": (512, 512), "attn.k_proj": (512, 512), "attn.v_proj": (512, 512), "attn.o_proj": (512, 512),
        "mlp.gate_proj": (1376, 512), "mlp.up_proj": (1376, 512), "mlp.down_proj": (512, 1376),
    }  # fmt: skip
    weights = {}
    for name, shape in shapes.items():
        weight = torch.randn(shape, generator=generator) * 0.02
        outliers = torch.randint(0, shape[1], (4,), generator=generator)
        weight[:, outliers] *= 8
        weights[name] = weight.to(torch.bfloat16)
    return weights


def _formats() -> list[tuple[str, Callable[[torch.Tensor], tuple[Callable[[], torch.Tensor], float]]]]:
    """(name, quantize) pairs; quantize returns (a dequantize closure, stored bytes)."""

    def four_bit(quant_type: str, blocksize: int, nested: bool):
        def run(weight):
            packed, state = F.quantize_4bit(
                weight, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested
            )
            size = packed.numel() * packed.element_size() + state.absmax.numel() * state.absmax.element_size()
            if nested:
                size += state.state2.absmax.numel() * 4 + 4
            return (lambda: F.dequantize_4bit(packed, state)), size

        return run

    def blockwise(blocksize: int):
        def run(weight):
            codes, state = F.quantize_blockwise(weight, blocksize=blocksize)
            return (lambda: F.dequantize_blockwise(codes, state)), codes.numel() + state.absmax.numel() * 4

        return run

    def int8(granularity: str, symmetric: bool):
        def run(weight):
            q, state = F.quantize_int8(weight, granularity, symmetric=symmetric, group_size=32)
            return (lambda: F.dequantize_int8(q, state)), q.numel() + state.scale.numel() * 8

        return run

    return [
        ("int8 absmax per channel", int8("channel", True)),
        ("int8 zero-point group 32", int8("group", False)),
        ("8-bit blockwise (dynamic) 256", blockwise(256)),
        ("fp4 blocksize 64", four_bit("fp4", 64, False)),
        ("nf4 blocksize 64", four_bit("nf4", 64, False)),
        ("nf4 blocksize 64 + double quant", four_bit("nf4", 64, True)),
        ("nf4 blocksize 128 + double quant", four_bit("nf4", 128, True)),
    ]


def _median_ms(fn: Callable[[], object], repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def demo_table(weights: dict[str, torch.Tensor]) -> list[dict[str, float | str]]:
    """Size, error and speed of each format over all weights of the model."""
    total = sum(w.numel() for w in weights.values())
    reference_norm = sum(w.float().pow(2).sum().item() for w in weights.values())
    rows: list[dict[str, float | str]] = [
        {"format": "bf16 (original)", "bits": 16.0, "MiB": total * 2 / 2**20, "mean_abs": 0.0, "snr_db": float("inf"),
         "quantize_ms": 0.0, "dequantize_ms": 0.0}
    ]
    for name, quantize in _formats():
        size = 0
        abs_error = 0.0
        noise = 0.0
        quantize_ms = dequantize_ms = 0.0
        for weight in weights.values():
            quantize_ms += _median_ms(lambda: quantize(weight))
            dequantize, stored = quantize(weight)
            dequantize_ms += _median_ms(dequantize)
            difference = dequantize().float() - weight.float()
            size += stored
            abs_error += difference.abs().sum().item()
            noise += difference.pow(2).sum().item()
        rows.append({
            "format": name, "bits": size * 8 / total, "MiB": size / 2**20, "mean_abs": abs_error / total,
            "snr_db": 10 * torch.log10(torch.tensor(reference_norm / max(noise, 1e-30))).item(),
            "quantize_ms": quantize_ms, "dequantize_ms": dequantize_ms,
        })  # fmt: skip
    return rows


def format_table(rows: list[dict[str, float | str]]) -> str:
    header = (
        f"{'format':<34} {'bits/param':>10} {'size MiB':>9} {'mean |err|':>11} {'SNR dB':>7} "
        f"{'quant ms':>9} {'dequant ms':>10}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row['format']:<34} {row['bits']:>10.3f} {row['MiB']:>9.3f} {row['mean_abs']:>11.2e} "
            f"{row['snr_db']:>7.1f} {row['quantize_ms']:>9.2f} {row['dequantize_ms']:>10.2f}"
        )
    return "\n".join(lines)


def formats(seed: int = 0, plot: str | None = None) -> int:
    """``bnbx formats``: the size and error table of every storage format on the built-in synthetic block."""
    weights = demo_model(seed)
    count = sum(w.numel() for w in weights.values())
    print(f"bnbx {bnbx.__version__} formats: one LLaMA-shaped block, {len(weights)} bf16 weights, {count / 1e6:.2f}M "
          f"parameters; CPU kernels: {_library.cpu_capability()}, {torch.get_num_threads()} threads\n")
    rows = demo_table(weights)
    print(format_table(rows))
    print("\nSNR = 10 log10(|W|^2 / |W - dequantize(quantize(W))|^2); times summed over the weights (median of 5).")
    if plot:
        _plot(rows, plot)
        print(f"plot written to {plot}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m bnbx``: the same commands as the ``bnbx`` console script (see :mod:`bnbx.cli`)."""
    from bnbx.cli import main as cli_main

    return cli_main(argv)


def _plot(rows: list[dict[str, float | str]], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install matplotlib") from None
    figure, axes = plt.subplots(figsize=(8, 4.5))
    markers = "osD^vP*Xh"
    for index, row in enumerate(rows[1:]):
        axes.scatter(row["bits"], row["snr_db"], marker=markers[index % len(markers)], s=50, label=str(row["format"]))
    axes.legend(fontsize=8, loc="lower right")
    axes.set_xlabel("bits per parameter")
    axes.set_ylabel("SNR (dB), higher is better")
    axes.set_title("bnbx storage formats on the built-in model")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
