"""4-bit quantize / dequantize of LLM weights: bnbx against bitsandbytes and plain torch, in one table.

    python benchmarks/bench_quant.py [--device cpu|cuda|all] [--shapes 4096x11008,4096x4096] [--repeat 20]
                                     [--threads N] [--isa scalar|avx2|avx512]

Rows: quantize and dequantize, NF4 and FP4, plain and double-quantized statistics (compress_statistics=True;
dequantize decodes them), bf16 weights, blocksize 64. Columns:
- bnbx ms: median wall time (CPU: time.perf_counter; CUDA: CUDA events) after a warm-up, rotating 4 (CPU) or
  8 (CUDA) copies of every operand so that none is still in a cache. Dequantize writes into preallocated
  outputs (out=), so this is the kernel; quantize always allocates its outputs, as the op does.
- GB/s: bytes moved / time, bytes moved = the bf16 weight + the packed codes + the statistics as stored
  (absmax fp32, or uint8 absmax + nested fp32 absmax + offset), read on one side and written on the other.
- % copy: that rate over this machine's copy bandwidth, measured in the same run just before and just after
  the bnbx rows (the better of the two; a weight-sized bf16 tensor's .copy_, bytes read + written). The
  bnbx rows run first, back to back, and the slow baselines after them.
- new out ms: dequantize into a freshly allocated output, the way bitsandbytes and the plain-torch version
  run (bitsandbytes has no CPU out= kernel); page faults of a fresh allocation count here. On Linux a
  fresh 90 MB tensor costs tens of ms of faults and zeroing; THP_MEM_ALLOC_ENABLE=1 (torch's allocator
  asks for huge pages) removes most of that; the header says whether it was set. bnbx's large CPU outputs
  come from its cache of freed outputs (BNBX_CPU_CACHE_MB; the header prints it), so after the first call
  they fault nothing. With bitsandbytes
  installed, this column and bitsandbytes' dequantize are timed alternately, call for call, because a fresh
  output's cost depends on the allocator's state (what was just freed), which differs between two
  separate loops.
- vs bnb, vs torch: how many times faster bnbx is than bitsandbytes (same op and arguments) and than the
  plain-torch version below, each compared with bnbx's like-for-like time (fresh outputs for dequantize).
  "n/a" when bitsandbytes is not installed (or has no kernel for the device).

Slow baselines are repeated fewer times (at least 3, about 3 s in all per row).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
import warnings
from typing import Callable, Optional

import torch

import bnbx
from bnbx import _library
from bnbx import functional as F

BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256
WEIGHT_DTYPE = torch.bfloat16
BASELINE_BUDGET_S = 3.0


# --- plain torch: what one writes without a kernel (bucketize on the code midpoints, like bitsandbytes'
# --- default backend); not bit-exact at ties, fast enough to be a fair baseline ------------------------


class TorchQuant:
    def __init__(self, device: torch.device):
        self.tables = {q: F.get_4bit_type(q, device) for q in ("nf4", "fp4")}
        nf4 = self.tables["nf4"]
        self.nf4_midpoints = (nf4[1:] + nf4[:-1]) / 2
        magnitudes = torch.tensor([0.0, 0.0625, 2, 3, 4, 6, 8, 12], device=device) / 12  # sorted FP4 magnitudes
        self.fp4_midpoints = (magnitudes[1:] + magnitudes[:-1]) / 2
        self.fp4_codes = torch.tensor([0b000, 0b001, 0b110, 0b111, 0b100, 0b101, 0b010, 0b011], dtype=torch.uint8,
                                      device=device)  # fmt: skip
        self.dynamic = F.create_dynamic_map().to(device)
        self.dynamic_midpoints = (self.dynamic[1:] + self.dynamic[:-1]) / 2

    @staticmethod
    def _rows(flat: torch.Tensor, width: int) -> torch.Tensor:
        pad = (-flat.numel()) % width
        return torch.nn.functional.pad(flat, (0, pad)).view(-1, width)

    def quantize(self, A: torch.Tensor, quant_type: str, compress: bool):
        blocks = self._rows(A.reshape(-1).float(), BLOCKSIZE)
        absmax = blocks.abs().amax(dim=1)
        scaled = blocks * (1.0 / absmax.clamp_min(torch.finfo(torch.float32).tiny))[:, None]
        if quant_type == "nf4":
            codes = torch.bucketize(scaled, self.nf4_midpoints).to(torch.uint8)
        else:
            sign = (scaled < 0).to(torch.uint8) << 3
            codes = self.fp4_codes[torch.bucketize(scaled.abs(), self.fp4_midpoints)] | sign
        pairs = codes.view(-1, 2)
        packed = (pairs[:, 0] << 4) | pairs[:, 1]
        if not compress:
            return packed, absmax
        offset = absmax.mean()
        nested = self._rows(absmax - offset, NESTED_BLOCKSIZE)
        nested_absmax = nested.abs().amax(dim=1)
        qabsmax = torch.bucketize(nested / nested_absmax.clamp_min(torch.finfo(torch.float32).tiny)[:, None],
                                  self.dynamic_midpoints).to(torch.uint8)  # fmt: skip
        return packed, (qabsmax, nested_absmax, offset, absmax.numel())

    def dequantize(self, packed: torch.Tensor, stats, shape, quant_type: str, compress: bool) -> torch.Tensor:
        if compress:
            qabsmax, nested_absmax, offset, blocks = stats
            absmax = (self.dynamic[qabsmax.long()] * nested_absmax[:, None]).reshape(-1)[:blocks] + offset
        else:
            absmax = stats
        codes = torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1, BLOCKSIZE).long()
        values = self.tables[quant_type][codes] * absmax[:, None]
        return values.to(WEIGHT_DTYPE).reshape(-1)[: math.prod(shape)].view(shape)


# --- timing ------------------------------------------------------------------------------------------------


class Timer:
    def __init__(self, device: torch.device):
        self.device = device

    def once(self, fn: Callable[[], object]) -> float:
        """Seconds for one call."""
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        begin = time.perf_counter()
        fn()
        return time.perf_counter() - begin

    def median_ms(self, fns: list[Callable[[], object]], repeat: int, budget_s: Optional[float] = None) -> float:
        """Median over `repeat` calls (fewer, at least 3, when `budget_s` runs out), rotating over `fns`
        (one per operand copy), after one warm-up call per copy (one in all for slow, budgeted baselines)."""
        for fn in fns if budget_s is None else fns[:1]:
            self.once(fn)
        first = self.once(fns[0])
        if budget_s is not None:
            repeat = max(3, min(repeat, int(budget_s / max(first, 1e-9))))
        times = [first] + [self.once(fns[(i + 1) % len(fns)]) for i in range(repeat - 1)]
        return statistics.median(times) * 1e3

    def interleaved_median_ms(
        self, fns_a: list[Callable[[], object]], fns_b: list[Callable[[], object]], repeat: int
    ) -> tuple[float, float]:
        """Medians of two functions timed alternately (a, b, a, b, ...), so both see the same machine and the
        same allocator state: a fresh output's cost depends on what was freed just before."""
        for fn in fns_a + fns_b:
            self.once(fn)
        times_a, times_b = [], []
        for i in range(repeat):
            times_a.append(self.once(fns_a[i % len(fns_a)]))
            times_b.append(self.once(fns_b[i % len(fns_b)]))
        return statistics.median(times_a) * 1e3, statistics.median(times_b) * 1e3


def copy_bandwidth_gbs(timer: Timer, elements: int, copies: int, repeat: int, device: torch.device) -> float:
    sources = [torch.randn(elements, device=device).to(WEIGHT_DTYPE) for _ in range(copies)]
    targets = [torch.empty_like(s).zero_() for s in sources]
    fns = [lambda s=s, t=t: t.copy_(s) for s, t in zip(sources, targets)]
    ms = timer.median_ms(fns, max(repeat, 10))
    return 2 * elements * sources[0].element_size() / (ms * 1e6)


def bytes_moved(elements: int, compress: bool) -> int:
    blocks = math.ceil(elements / BLOCKSIZE)
    stats = blocks + 4 * math.ceil(blocks / NESTED_BLOCKSIZE) + 4 if compress else 4 * blocks
    return elements * torch.finfo(WEIGHT_DTYPE).bits // 8 + math.ceil(elements / 2) + stats


# --- the rows ----------------------------------------------------------------------------------------------


def load_bitsandbytes():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import bitsandbytes
            import bitsandbytes.functional as bnb_functional
    except Exception:  # not installed, or fails to load its native library
        return None, None
    return bitsandbytes.__version__, bnb_functional


def bench_device(device: torch.device, shapes, args, bnb_functional) -> tuple[list[list[str]], float]:
    """bnbx rows and the copy bandwidth first, back to back (a short window: on a shared machine they see the
    same conditions), then the baselines, which are hundreds of times slower and insensitive to noise."""
    timer = Timer(device)
    copies = 8 if device.type == "cuda" else 4
    # at least 64 MiB per copy, larger than the caches whatever --shapes says
    copy_elements = max(max(math.prod(s) for s in shapes), 1 << 25)
    copy_gbs = copy_bandwidth_gbs(timer, copy_elements, copies, args.repeat, device)
    weights = {shape: [torch.randn(shape, device=device).to(WEIGHT_DTYPE) for _ in range(copies)] for shape in shapes}
    configs = [(shape, q, c) for shape in shapes for q in ("nf4", "fp4") for c in (False, True)]

    bnbx_ms = {}
    for shape, quant_type, compress in configs:
        ws = weights[shape]
        quantize = [
            lambda w=w: F.quantize_4bit(w, blocksize=BLOCKSIZE, quant_type=quant_type, compress_statistics=compress)
            for w in ws
        ]
        q_ms = timer.median_ms(quantize, args.repeat)
        quantized = [fn() for fn in quantize]
        outs = [torch.empty(shape, dtype=WEIGHT_DTYPE, device=device) for _ in range(copies)]
        dq_ms = timer.median_ms(
            [lambda p=p, s=s, o=o: F.dequantize_4bit(p, s, out=o) for (p, s), o in zip(quantized, outs)], args.repeat
        )
        del outs
        dq_new_ms = timer.median_ms([lambda p=p, s=s: F.dequantize_4bit(p, s) for p, s in quantized], args.repeat)
        bnbx_ms[(shape, quant_type, compress)] = (q_ms, dq_ms, dq_new_ms)
    # measured again, the better of both: a busy moment must not pass for the machine's bandwidth
    copy_gbs = max(copy_gbs, copy_bandwidth_gbs(timer, copy_elements, copies, args.repeat, device))

    plain = TorchQuant(device)
    rows = []
    for shape, quant_type, compress in configs:
        ws = weights[shape]
        bnb_q = bnb_dq = None
        if bnb_functional is not None:
            try:
                bnb_quantize = [
                    lambda w=w: bnb_functional.quantize_4bit(
                        w, blocksize=BLOCKSIZE, quant_type=quant_type, compress_statistics=compress
                    )
                    for w in ws
                ]
                bnb_q = timer.median_ms(bnb_quantize, args.repeat, BASELINE_BUDGET_S)
                bnb_state = [fn() for fn in bnb_quantize]
                # a fresh output each call on both sides, timed alternately (see interleaved_median_ms)
                ours = [F.quantize_4bit(w, blocksize=BLOCKSIZE, quant_type=quant_type, compress_statistics=compress)
                        for w in ws]  # fmt: skip
                dq_new_fair, bnb_dq = timer.interleaved_median_ms(
                    [lambda p=p, s=s: F.dequantize_4bit(p, s) for p, s in ours],
                    [lambda p=p, s=s: bnb_functional.dequantize_4bit(p, s) for p, s in bnb_state],
                    args.repeat,
                )
                q_ms, dq_ms, _ = bnbx_ms[(shape, quant_type, compress)]
                bnbx_ms[(shape, quant_type, compress)] = (q_ms, dq_ms, dq_new_fair)
                del bnb_state, ours
            except Exception as error:  # e.g. no kernel for this device
                print(f"bitsandbytes 4-bit failed on {device}: {error}", file=sys.stderr)
        torch_quantize = [lambda w=w: plain.quantize(w, quant_type, compress) for w in ws]
        torch_q = timer.median_ms(torch_quantize, args.repeat, BASELINE_BUDGET_S)
        torch_state = [fn() for fn in torch_quantize]
        torch_dq = timer.median_ms(
            [lambda p=p, s=s: plain.dequantize(p, s, shape, quant_type, compress) for p, s in torch_state],
            args.repeat,
            BASELINE_BUDGET_S,
        )
        del torch_state
        q_ms, dq_ms, dq_new_ms = bnbx_ms[(shape, quant_type, compress)]
        moved = bytes_moved(math.prod(shape), compress)
        label = [device.type, "x".join(map(str, shape))]
        tail = [quant_type, "yes" if compress else "no"]
        rows.append(label + ["quantize"] + tail + row_numbers(q_ms, q_ms, moved, copy_gbs, bnb_q, torch_q))
        rows.append(label + ["dequantize"] + tail + row_numbers(dq_ms, dq_new_ms, moved, copy_gbs, bnb_dq, torch_dq))
    return rows, copy_gbs


def fmt_ms(ms: float) -> str:
    return f"{ms:.1f}" if ms >= 100 else f"{ms:.2f}" if ms >= 1 else f"{ms:.3f}"


def row_numbers(ms: float, like_ms: float, moved: int, copy_gbs: float, bnb_ms, torch_ms) -> list[str]:
    gbs = moved / (ms * 1e6)
    return [
        fmt_ms(ms),
        f"{gbs:.1f}",
        f"{100 * gbs / copy_gbs:.0f}%",
        "=" if like_ms == ms else fmt_ms(like_ms),
        "n/a" if bnb_ms is None else fmt_ms(bnb_ms),
        "n/a" if bnb_ms is None else f"{bnb_ms / like_ms:.1f}x",
        fmt_ms(torch_ms),
        f"{torch_ms / like_ms:.1f}x",
    ]


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    numeric_from = 5  # left-align the labels, right-align the numbers

    def line(cells):
        return "  ".join(c.ljust(w) if i < numeric_from else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    print(line(header))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(line(row))


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def parse_shapes(text: str) -> list[tuple[int, ...]]:
    return [tuple(int(d) for d in item.lower().split("x")) for item in text.split(",") if item]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--device",
        default="all",
        choices=["cpu", "cuda", "all"],
        help="all: the CPU, plus CUDA when a GPU and a CUDA build of bnbx are present",
    )
    parser.add_argument(
        "--shapes", default="4096x11008,4096x4096", help="comma-separated weight shapes, e.g. 4096x11008"
    )
    parser.add_argument("--repeat", type=int, default=20, help="timed calls per bnbx row (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU); default: torch's")
    parser.add_argument("--isa", default=None, choices=["scalar", "avx2", "avx512"], help="bnbx CPU kernels to use")
    args = parser.parse_args()  # fmt: skip

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.isa is not None:
        _library.set_cpu_capability(args.isa)
    shapes = parse_shapes(args.shapes)
    cuda_ready = torch.cuda.is_available() and bnbx.cuda_built()
    devices = []
    if args.device in ("cpu", "all"):
        devices.append(torch.device("cpu"))
    if args.device == "cuda" and not cuda_ready:
        sys.exit("bench_quant: --device cuda needs a CUDA GPU and a bnbx built with CUDA kernels")
    if args.device in ("cuda", "all") and cuda_ready:
        devices.append(torch.device("cuda"))

    bnb_version, bnb_functional = load_bitsandbytes()
    torch.manual_seed(0)
    all_rows, notes = [], []
    for device in devices:
        rows, copy_gbs = bench_device(device, shapes, args, bnb_functional)
        all_rows += rows
        if device.type == "cpu":
            notes.append(f"cpu: {cpu_name()}, {torch.get_num_threads()} threads, "
                         f"bnbx kernels {_library.cpu_capability()}, copy bandwidth {copy_gbs:.1f} GB/s")  # fmt: skip
        else:
            notes.append(f"cuda: {torch.cuda.get_device_name(device)}, copy bandwidth {copy_gbs:.1f} GB/s")
    thp = os.environ.get("THP_MEM_ALLOC_ENABLE", "unset")
    cache_mib = bnbx.cpu_cache_stats()["limit_bytes"] >> 20
    print(f"bnbx {bnbx.__version__}, torch {torch.__version__}, bitsandbytes {bnb_version or 'not installed'}; "
          f"bf16 weights, blocksize {BLOCKSIZE}, dq = double quantization; THP_MEM_ALLOC_ENABLE={thp}; "
          f"bnbx CPU output cache {cache_mib} MiB; " + "; ".join(notes))  # fmt: skip
    header = ["device", "weight", "op", "type", "dq", "bnbx ms", "GB/s", "% copy", "new out ms",
              "bnb ms", "vs bnb", "torch ms", "vs torch"]  # fmt: skip
    print_table(header, all_rows)


if __name__ == "__main__":
    main()
