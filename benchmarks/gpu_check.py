"""The prepared GPU check (make gpu-check): one command on a fresh GPU machine, under 5 minutes, one report.

    python benchmarks/gpu_check.py [--report gpu_check_report.md] [--dry-run] [--skip STEP ...]

Steps, each timed and recorded with its output's tail in the report:
  env        nvidia-smi, python, torch, the GPU and its compute capability
  build      the extension for the present architecture only (cmake, BNBX_CUDA=ON), _C.so into bnbx/
  tests      the CUDA tests: CPU-vs-CUDA bytes (tests/test_cuda_parity.py), no host sync and CUDA-graph
             capture (tests/test_no_sync.py), and every test of the suite parametrized over "cuda"
  sanitizer  compute-sanitizer memcheck, racecheck and synccheck over benchmarks/gpu_sanitize_cases.py
  bench      benchmarks/bench_cuda_ops.py: raw ops and Python wrappers against a plain copy;
             benchmarks/bench_cuda_matmul_4bit.py: matmul_4bit's paths against bf16 linear and bitsandbytes
--dry-run runs every step that needs no GPU as far as it can here (build: configure only when nvcc and a CUDA
torch are present; tests: collection; sanitizer: the cases on the CPU and the tool lookup; bench: a tiny
shape on the CPU), so a typo cannot waste the GPU's minutes. tests/test_gpu_check.py runs it in CI.
"""

from __future__ import annotations

import argparse
import glob
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["env", "build", "tests", "sanitizer", "bench"]
TAIL = 6000  # characters of each command's output kept in the report


class Report:
    def __init__(self, path: Path, dry_run: bool):
        self.path = path
        self.dry_run = dry_run
        self.sections: list[str] = []
        self.results: list[tuple[str, str, float]] = []

    def run(self, step: str, argv: list[str], timeout: float, env: dict | None = None) -> tuple[int, str]:
        """Run one command from the repository root; returns (exit status, output), recorded in the report."""
        print(f"[{step}] $ {' '.join(argv)}", flush=True)
        full_env = {
            **os.environ,
            "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        start = time.perf_counter()
        try:
            proc = subprocess.run(
                argv, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout, check=False
            )
            status, output = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as error:
            status = 124
            output = f"{error.stdout or ''}{error.stderr or ''}\n(timed out after {timeout:.0f} s)"
            output = output if isinstance(output, str) else output.decode(errors="replace")
        except FileNotFoundError as error:
            status, output = 127, str(error)
        elapsed = time.perf_counter() - start
        print(output[-2000:], flush=True)
        tail = output[-TAIL:]
        self.sections.append(f"### {step}: `{' '.join(argv)}`\n\nexit {status}, {elapsed:.1f} s\n\n```\n{tail}\n```\n")
        return status, output

    def note(self, step: str, text: str) -> None:
        print(f"[{step}] {text}", flush=True)
        self.sections.append(f"### {step}\n\n{text}\n")

    def result(self, step: str, outcome: str, seconds: float) -> None:
        self.results.append((step, outcome, seconds))

    def write(self) -> None:
        mode = "dry run (no GPU steps executed)" if self.dry_run else "GPU run"
        stamp = f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}, {platform.node()}, python {platform.python_version()}"
        lines = [f"# bnbx GPU check: {mode}", "", stamp, "", "| step | result | seconds |", "|---|---|---:|"]
        lines += [f"| {s} | {o} | {t:.1f} |" for s, o, t in self.results]
        lines += ["", "## Details", ""] + self.sections
        self.path.write_text("\n".join(lines))
        print(f"report: {self.path}")


def python() -> str:
    return sys.executable


def gpu_arch() -> str | None:
    """The present GPU's compute capability as CMake wants it ("90"), or None without a GPU."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return f"{major}{minor}"
    except ImportError:
        pass
    return None


def find_compute_sanitizer() -> str | None:
    """compute-sanitizer from PATH, the CUDA toolkit, or a pip wheel's package directory."""
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    candidates = [os.path.join(os.environ.get(v, ""), "bin", "compute-sanitizer") for v in ("CUDA_HOME", "CUDA_PATH")]
    candidates += [
        "/usr/local/cuda/bin/compute-sanitizer",
        *sorted(glob.glob("/usr/local/cuda*/bin/compute-sanitizer")),
        *sorted(glob.glob("/opt/nvidia/**/compute-sanitizer", recursive=True)),
    ]
    # The PyPI wheels nvidia-cuda-sanitizer-api(-cu12) install under site-packages/nvidia/cuda_sanitizer_api;
    # the 12.8 wheel holds only the sanitizer API libraries, so a binary there is used when a version has one.
    for site in sys.path:
        candidates += sorted(
            glob.glob(os.path.join(site, "nvidia", "cuda_sanitizer_api", "**", "compute-sanitizer"), recursive=True)
        )
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent / "compute-sanitizer"))
    return next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


def step_env(report: Report, args) -> str:
    if shutil.which("nvidia-smi"):
        report.run(
            "env", ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv"], 60
        )
    else:
        report.note("env", "nvidia-smi not found")
    probe = (
        "import torch, platform; print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', "
        "torch.version.cuda, 'gpu', torch.cuda.is_available() and torch.cuda.get_device_name(), 'capability', "
        "torch.cuda.is_available() and torch.cuda.get_device_capability())"
    )
    status, _ = report.run("env", [python(), "-c", probe], 120)
    return "ok" if status == 0 else "FAILED"


def step_build(report: Report, args) -> str:
    arch = gpu_arch()
    build = ROOT / "build" / "gpu-check"
    configure = [
        "cmake",
        "-S",
        str(ROOT),
        "-B",
        str(build),
        "-DBNBX_CUDA=ON",
        f"-DCMAKE_CUDA_ARCHITECTURES={arch or 90}",
        f"-DPython_EXECUTABLE={python()}",
        "-DBNBX_COPY_TO_SOURCE=ON",
    ]
    compile_ = ["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2)]
    if args.dry_run:
        if shutil.which("nvcc") is None or shutil.which("cmake") is None:
            report.note(
                "build",
                f"dry run: would run {' '.join(configure)} && {' '.join(compile_)} "
                "(nvcc or cmake missing here, not configured)",
            )
            return "dry (not configured)"
        # configure only, into a scratch directory, when this machine has a CUDA torch to configure against
        status, output = report.run(
            "build",
            configure[:4]
            + [str(Path(args.scratch) / "gpu-check-build")]
            + configure[5:7]
            + ["-DBNBX_COPY_TO_SOURCE=OFF"]
            + configure[7:8],
            600,
        )
        if status != 0 and "CPU build" in output:
            return "dry (CPU torch here: configure refused as expected)"
        return "dry (configured)" if status == 0 else "FAILED"
    if arch is None:
        report.note("build", "no GPU visible to torch")
        return "FAILED"
    status, _ = report.run("build", configure, 600)
    if status == 0:
        status, _ = report.run("build", compile_, 900)
    return "ok" if status == 0 else "FAILED"


def step_tests(report: Report, args) -> str:
    files = ["tests/test_cuda_parity.py", "tests/test_no_sync.py"]
    if args.dry_run:
        status, _ = report.run(
            "tests", [python(), "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider", *files], 300
        )
        return "dry (collected)" if status == 0 else "FAILED"
    status1, _ = report.run("tests", [python(), "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", *files], 900)
    # every other test parametrized over devices, on the GPU
    status2, _ = report.run(
        "tests",
        [
            python(),
            "-m",
            "pytest",
            "-q",
            "-rfE",
            "-p",
            "no:cacheprovider",
            "tests",
            "-k",
            "cuda and not emulation",
            "--ignore=tests/test_cuda_parity.py",
            "--ignore=tests/test_no_sync.py",
        ],
        600,
    )
    return "ok" if status1 == 0 and status2 in (0, 5) else "FAILED"


def step_sanitizer(report: Report, args) -> str:
    cases = [python(), "benchmarks/gpu_sanitize_cases.py"]
    tool = find_compute_sanitizer()
    if args.dry_run:
        status, _ = report.run("sanitizer", cases + ["--device", "cpu"], 600)
        report.note(
            "sanitizer",
            f"compute-sanitizer here: {tool or 'not found'}; on the GPU each of memcheck, "
            f"racecheck, synccheck runs: compute-sanitizer --tool TOOL --error-exitcode 99 "
            f"{' '.join(cases)}",
        )
        return "dry (cases ran on cpu)" if status == 0 else "FAILED"
    if tool is None:
        report.note("sanitizer", "compute-sanitizer not found (PATH, CUDA_HOME, /usr/local/cuda, pip wheels)")
        return "FAILED (no compute-sanitizer)"
    outcomes = []
    for check in ("memcheck", "racecheck", "synccheck"):
        extra = ["--leak-check", "no"] if check == "memcheck" else []
        status, _ = report.run(
            "sanitizer", [tool, "--tool", check, "--error-exitcode", "99", *extra, *cases], args.sanitizer_timeout
        )
        outcomes.append(f"{check} {'ok' if status == 0 else 'FAILED' if status != 124 else 'timeout'}")
    return ", ".join(outcomes)


def step_bench(report: Report, args) -> str:
    if args.dry_run:
        status, _ = report.run(
            "bench",
            [python(), "benchmarks/bench_cuda_ops.py", "--device", "cpu", "--shape", "64x256", "--repeat", "2"],
            300,
        )
        matmul = ["benchmarks/bench_cuda_matmul_4bit.py", "--device", "cpu", "--k", "256", "--n", "64"]
        status2, _ = report.run("bench", [python(), *matmul, "--m", "1,16", "--repeat", "2"], 300)
        return "dry (cpu, tiny)" if status == 0 and status2 == 0 else "FAILED"
    status, _ = report.run(
        "bench",
        [python(), "benchmarks/bench_cuda_ops.py", "--device", "cuda", "--shape", "11008x4096", "--repeat", "50"],
        600,
    )
    status2, _ = report.run("bench", [python(), "benchmarks/bench_cuda_matmul_4bit.py", "--device", "cuda"], 600)
    return "ok" if status == 0 and status2 == 0 else "FAILED"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--report", default=str(ROOT / "gpu_check_report.md"))
    parser.add_argument("--dry-run", action="store_true", help="run what needs no GPU; the rest is only checked")
    parser.add_argument("--skip", nargs="*", default=[], choices=STEPS)
    parser.add_argument("--scratch", default=os.environ.get("TMPDIR", "/tmp"), help="dry-run build directory")
    parser.add_argument("--sanitizer-timeout", type=float, default=240, help="seconds per compute-sanitizer tool")
    args = parser.parse_args(argv)
    report = Report(Path(args.report), args.dry_run)
    steps = {
        "env": step_env,
        "build": step_build,
        "tests": step_tests,
        "sanitizer": step_sanitizer,
        "bench": step_bench,
    }
    failed = False
    for name in STEPS:
        if name in args.skip:
            report.result(name, "skipped", 0.0)
            continue
        start = time.perf_counter()
        try:
            outcome = steps[name](report, args)
        except Exception as error:  # noqa: BLE001 - a broken step must not lose the report of the others
            outcome = f"FAILED ({type(error).__name__}: {error})"
        report.result(name, outcome, time.perf_counter() - start)
        failed |= "FAILED" in outcome
        if name == "build" and "FAILED" in outcome and not args.dry_run:
            for rest in STEPS[STEPS.index(name) + 1 :]:
                report.result(rest, "not run (build failed)", 0.0)
            break
    report.write()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
