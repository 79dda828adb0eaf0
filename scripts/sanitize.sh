#!/usr/bin/env bash
# ASan + UBSan run of the CPU kernels and the CUDA emulation (make sanitize; part of make test).
# Builds _C.so with -fsanitize=address,undefined into build/sanitize, puts it in a copy of the bnbx package
# there, and runs a fast subset of the tests against that copy with the ASan runtime preloaded into Python
# (torch itself is not instrumented; leak checking is off because Python never frees everything at exit).
# The emulated CUDA kernels are rebuilt with the same sanitizers (BNBX_EMU_SANITIZE=address).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
BUILD=${BUILD:-build/sanitize}
CXX=${CXX:-g++}
ROOT=$(pwd)

cmake -S . -B "$BUILD" -DBNBX_CUDA=OFF -DBNBX_SANITIZE=ON -DBNBX_COPY_TO_SOURCE=OFF \
  -DPython_EXECUTABLE="$(command -v "$PYTHON")" >"$BUILD.log" 2>&1 || { cat "$BUILD.log"; exit 1; }
cmake --build "$BUILD" -j"${JOBS:-2}" >>"$BUILD.log" 2>&1 || { tail -50 "$BUILD.log"; exit 1; }

pkg="$BUILD/pkg"
rm -rf "$pkg" && mkdir -p "$pkg"
cp -r bnbx "$pkg/"
rm -f "$pkg"/bnbx/_C*.so
cp "$BUILD/_C.so" "$pkg/bnbx/"

asan=$("$CXX" -print-file-name=libasan.so)
ubsan=$("$CXX" -print-file-name=libubsan.so)
[ -e "$asan" ] || { echo "sanitize: $CXX has no libasan.so ($asan)"; exit 1; }

# The subset: every op's reference tests, bad inputs, the instruction-set comparison, and the emulated CUDA
# kernels on the small sizes (BNBX_EMU_QUICK drops the multi-wave ones, which only add run time here).
tests=(test_quantize_4bit.py test_quantize_8bit.py test_int8.py test_errors.py test_cpu_isa.py
       test_cuda_emulation.py test_matmul_4bit.py lora/test_lora_ops.py)
# Reports go to files: pytest captures a test's stderr, and a sanitizer that stops the process mid-test would
# take its report down with the capture.
reports="$(cd "$BUILD" && pwd)/reports"
rm -rf "$reports" && mkdir -p "$reports"
cd "$pkg"  # so `import bnbx` finds the instrumented copy, not the source tree
status=0
env LD_PRELOAD="$asan:$ubsan" \
  ASAN_OPTIONS="log_path=$reports/asan:detect_leaks=0:halt_on_error=1:abort_on_error=0:detect_odr_violation=0" \
  UBSAN_OPTIONS="log_path=$reports/ubsan:halt_on_error=1:print_stacktrace=1" \
  BNBX_EMU_SANITIZE=address BNBX_EMU_QUICK=1 \
  "$PYTHON" -m pytest -q -p no:cacheprovider -x "${tests[@]/#/$ROOT/tests/}" "$@" || status=$?
# (warnings such as ASan's note on makecontext also land there: only errors fail the run)
if compgen -G "$reports/*" >/dev/null && grep -q -E "ERROR: AddressSanitizer|runtime error" "$reports"/*; then
  echo "sanitize: sanitizer reports:"
  head -n 60 "$reports"/*
  [ "$status" -ne 0 ] || status=1
fi
exit "$status"
