#!/usr/bin/env bash
# The GPU check (docs/architecture.md, "The GPU check"): everything that needs a GPU, in one command, under 8 minutes.
#
#   bash bench/gpu_check.sh                 # on a GPU host: build for its arch, pytest -m gpu, benchmark, JSON
#   bash bench/gpu_check.sh --cpu-dry-run   # anywhere: no build, gpu tests only collected, benchmark harness
#                                           # on the CPU (tiny shapes); < 1 minute
#
# Steps, each under a `timeout` so the whole stays inside ESTA_CHECK_TOTAL_S (default 470 s):
#   1. TORCH_CUDA_ARCH_LIST=<the card's, else 9.0> ESTA_BUILD_CUDA=1 pip install --no-build-isolation
#      --no-deps -e .   (falls back to `setup.py build_ext --inplace` when pip itself refuses quickly)
#   2. the cases that once crashed (Triton backend, r = 1, M = 7, float16 and bfloat16, both GEMM paths)
#      under `compute-sanitizer --tool memcheck` (python -m tests.helpers.gpu_matrix), first, since a CUDA fault is sticky
#      for its process; the verdict goes into the JSON
#   3. python -m pytest -m gpu -q tests    (failures are recorded, not fatal; tests/kernels/test_gpu_matrix.py runs
#      its path x dtype groups in processes of their own)
#   4. python bench/gpu_bench.py           (the GPU benchmark; writes JSON after every shape)
#   5. bench/gpu_report.py: $OUT/<card>-<date>.json (+ .build.log, .pytest.log, .bench.log,
#      .sanitizer.log), table last
#
# Environment: PYTHON (default .venv/bin/python when present, else python3); OUT (default bench/results,
# or a new temporary folder with --cpu-dry-run); ESTA_CHECK_TOTAL_S, ESTA_BUILD_TIMEOUT (220),
# ESTA_SANITIZER_TIMEOUT (60), ESTA_TEST_TIMEOUT (130), ESTA_BENCH_TIMEOUT (170); TORCH_CUDA_ARCH_LIST to
# override the arch.
set -euo pipefail

DRY=0
for arg in "$@"; do
  case "$arg" in
    --cpu-dry-run) DRY=1 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$arg' (expected --cpu-dry-run)" >&2; exit 2 ;;
  esac
done

cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if [ -z "${OUT:-}" ]; then
  if [ "$DRY" = 1 ]; then OUT=$(mktemp -d -t esta-gpu-check-XXXXXX); else OUT=bench/results; fi
fi
mkdir -p "$OUT"
MODE=gpu; [ "$DRY" = 1 ] && MODE=cpu-dry-run

TOTAL=${ESTA_CHECK_TOTAL_S:-470}
T0=$(date +%s)
WORK=$(mktemp -d -t esta-gpu-work-XXXXXX)
trap 'rm -rf "$WORK"' EXIT

now() { date +%s; }
# seconds for the next step: its own limit, or what is left of the total (minus room for the report)
budget() { local left=$(( TOTAL - ($(now) - T0) - 15 )); [ "$left" -lt "$1" ] && echo $(( left > 10 ? left : 10 )) || echo "$1"; }
# run a command under a timeout, output to a log; print the exit code (never fails the script)
run_logged() { local secs=$1 log=$2; shift 2; local rc=0; timeout --kill-after=10 "$secs" "$@" >"$log" 2>&1 || rc=$?; echo "$rc"; }

echo "== esta GPU check ($MODE): python $PYTHON, OUT $OUT, total budget ${TOTAL}s"

# ---------------------------------------------------------------------------------------------- 1. build
BUILD_STATUS=skipped; BUILD_S=0; BUILD_METHOD=none
if [ "$DRY" = 0 ]; then
  if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
    TORCH_CUDA_ARCH_LIST=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d ' ' || true)
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
  fi
  export TORCH_CUDA_ARCH_LIST
  # The CUDA kernels need the CUTLASS headers of the pinned nvidia-cutlass (setup.py names it when missing).
  # The GPU host has no network: install the wheel carried in .whl/ (or set CUTLASS_PATH to a CUTLASS tree).
  if [ -z "${CUTLASS_PATH:-}" ] && ! "$PYTHON" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('cutlass_library') is None)" 2>/dev/null; then
    for whl in .whl/nvidia_cutlass-*.whl; do
      [ -e "$whl" ] || continue
      echo "-- installing $whl (CUTLASS headers)"
      PIP_BREAK_SYSTEM_PACKAGES=1 "$PYTHON" -m pip install -q --no-deps --no-index "$whl" || echo "   failed to install $whl"
    done
  fi
  echo "-- build: TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST ESTA_BUILD_CUDA=1 pip install --no-build-isolation --no-deps -e ."
  t=$(now)
  # PIP_BREAK_SYSTEM_PACKAGES: the host's python3 may be marked externally managed; this host is throwaway
  rc=$(ESTA_BUILD_CUDA=1 PIP_BREAK_SYSTEM_PACKAGES=1 run_logged "$(budget "${ESTA_BUILD_TIMEOUT:-220}")" "$WORK/build.log" \
       "$PYTHON" -m pip install --no-build-isolation --no-deps -e .)
  BUILD_METHOD=pip
  if [ "$rc" != 0 ] && [ "$rc" != 124 ] && [ "$rc" != 137 ] && [ $(( $(now) - t )) -lt 60 ]; then
    # pip refused before compiling much (no pip, old setuptools, externally managed): build in place
    echo "   pip failed fast (exit $rc); retrying with setup.py build_ext --inplace"
    tail -n 5 "$WORK/build.log" | sed 's/^/   | /'
    mv "$WORK/build.log" "$WORK/build-pip.log"
    rc=$(ESTA_BUILD_CUDA=1 run_logged "$(budget "${ESTA_BUILD_TIMEOUT:-220}")" "$WORK/build.log" \
         "$PYTHON" setup.py build_ext --inplace)
    cat "$WORK/build-pip.log" >> "$WORK/build.log"
    BUILD_METHOD=build_ext_inplace
  fi
  BUILD_S=$(( $(now) - t ))
  case "$rc" in 0) BUILD_STATUS=ok ;; 124|137) BUILD_STATUS=timeout ;; *) BUILD_STATUS="failed (exit $rc)" ;; esac
  echo "   build $BUILD_STATUS in ${BUILD_S}s"
  [ "$BUILD_STATUS" = ok ] || tail -n 25 "$WORK/build.log" | sed 's/^/   | /'
fi
BACKENDS=$("$PYTHON" -c "import esta_kernels; print(','.join(esta_kernels.available_backends()))" 2>/dev/null | tail -n1 || true)
echo "   esta backends: ${BACKENDS:-<esta_kernels does not import>}"

# ------------------------------------------------------------------------------ 2. the crash cases, memcheck
t=$(now)
SANITIZER_RC=""
if [ "$DRY" = 0 ] && command -v compute-sanitizer >/dev/null 2>&1; then
  echo "-- memcheck: compute-sanitizer --tool memcheck python -m tests.helpers.gpu_matrix --r 1 --M 7 (fp16, bf16; tma, pointer)"
  SAN_SECS=$(budget "${ESTA_SANITIZER_TIMEOUT:-60}")
  : > "$WORK/sanitizer.log"
  pids=()
  for path in tma pointer; do
    for dt in float16 bfloat16; do
      ( rc=0; ESTA_TRITON_AUTOTUNE=0 timeout --kill-after=10 "$SAN_SECS" compute-sanitizer --tool memcheck \
          --error-exitcode 86 "$PYTHON" -m tests.helpers.gpu_matrix --path "$path" --dtype "$dt" --r 1 --M 7 \
          >"$WORK/sanitizer-$path-$dt.log" 2>&1 || rc=$?; echo "$rc" > "$WORK/sanitizer-$path-$dt.rc" ) &
      pids+=($!)
    done
  done
  # the pre-13 kernels, rank-1 buffers unpadded as in the probe: which kernel faulted (bench/repro/r1_crash.py)
  for dt in float16; do
    ( rc=0; ESTA_TRITON_AUTOTUNE=0 timeout --kill-after=10 "$SAN_SECS" compute-sanitizer --tool memcheck \
        --error-exitcode 86 "$PYTHON" bench/repro/r1_crash.py --dtype "$dt" \
        >"$WORK/sanitizer-pre13-$dt.log" 2>&1 || rc=$?; echo "$rc" > "$WORK/sanitizer-pre13-$dt.rc" ) &
    pids+=($!)
  done
  wait "${pids[@]}" || true
  rc=$(cat "$WORK/sanitizer-pre13-float16.rc" 2>/dev/null || echo missing)
  { echo "=== pre-13 kernels (bench/repro/r1_crash.py), float16: exit $rc"; cat "$WORK/sanitizer-pre13-float16.log"; } >> "$WORK/sanitizer.log"
  echo "   pre-13 kernels, r=1 unpadded (repro): exit $rc, $(grep -E 'ERROR SUMMARY' "$WORK/sanitizer-pre13-float16.log" | tail -n1 || true)"
  SANITIZER_RC=0
  for path in tma pointer; do
    for dt in float16 bfloat16; do
      rc=$(cat "$WORK/sanitizer-$path-$dt.rc" 2>/dev/null || echo missing)
      { echo "=== $path $dt: exit $rc"; cat "$WORK/sanitizer-$path-$dt.log"; } >> "$WORK/sanitizer.log"
      echo "   $path/$dt: exit $rc, $(grep -E 'ERROR SUMMARY' "$WORK/sanitizer-$path-$dt.log" | tail -n1 || true)"
      [ "$rc" = 0 ] || SANITIZER_RC=$rc
    done
  done
else
  echo "-- memcheck: skipped ($([ "$DRY" = 1 ] && echo 'dry run' || echo 'compute-sanitizer not found'))"
fi
SANITIZER_S=$(( $(now) - t ))

# ---------------------------------------------------------------------------------------------- 3. tests
t=$(now)
if [ "$DRY" = 0 ]; then
  echo "-- tests: pytest -m gpu -q tests"
  # ESTA_TRITON_AUTOTUNE=0: the tests run the first config of each Triton autotune list (every config is
  # compiled by tests/kernels/test_triton_compile.py; the benchmark autotunes and checks its results first)
  TEST_RC=$(ESTA_TRITON_AUTOTUNE=0 run_logged "$(budget "${ESTA_TEST_TIMEOUT:-130}")" "$WORK/pytest.log" \
            "$PYTHON" -m pytest -m gpu -q tests -p no:cacheprovider --junitxml="$WORK/junit.xml")
else
  # no GPU: only check that the gpu tests still collect
  echo "-- tests (dry run): pytest -m gpu --collect-only -q tests"
  TEST_RC=$(run_logged "$(budget 60)" "$WORK/pytest.log" "$PYTHON" -m pytest -m gpu --collect-only -q tests -p no:cacheprovider)
fi
TEST_S=$(( $(now) - t ))
echo "   pytest exit $TEST_RC in ${TEST_S}s: $(grep -E '(passed|failed|error|skipped|collected|selected|no tests ran)' "$WORK/pytest.log" | tail -n1 || true)"

# ------------------------------------------------------------------------------------------ 4. benchmark
t=$(now)
BENCH_SECS=$(budget "${ESTA_BENCH_TIMEOUT:-170}")
BENCH_ARGS=(--out "$WORK" --budget-s $(( BENCH_SECS > 40 ? BENCH_SECS - 25 : BENCH_SECS / 2 )))
[ "$DRY" = 1 ] && BENCH_ARGS+=(--cpu-dry-run)
echo "-- benchmark: bench/gpu_bench.py ${BENCH_ARGS[*]} (timeout ${BENCH_SECS}s)"
set +e
timeout --kill-after=10 "$BENCH_SECS" "$PYTHON" bench/gpu_bench.py "${BENCH_ARGS[@]}" --no-table 2>&1 | tee "$WORK/bench.log"
BENCH_RC=${PIPESTATUS[0]}
set -e
BENCH_S=$(( $(now) - t ))

# --------------------------------------------------------------------------------------------- 5. report
"$PYTHON" bench/gpu_report.py --work "$WORK" --out "$OUT" --mode "$MODE" \
  --build-status "$BUILD_STATUS" --build-seconds "$BUILD_S" --build-method "$BUILD_METHOD" \
  --test-rc "$TEST_RC" --test-seconds "$TEST_S" --bench-rc "$BENCH_RC" --bench-seconds "$BENCH_S" \
  ${SANITIZER_RC:+--sanitizer-rc "$SANITIZER_RC"} --sanitizer-seconds "$SANITIZER_S" \
  --total-seconds $(( $(now) - T0 )) ${BACKENDS:+--backends "$BACKENDS"}
