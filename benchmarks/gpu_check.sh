#!/usr/bin/env bash
# gpu_check.sh: everything that needs a GPU, in one run (<= 5 minutes on an H100/H200).
#
# Run from anywhere on a machine with an NVIDIA GPU (sm_90), a CUDA toolkit the
# driver supports, and a python that has the test dependencies (torch with CUDA,
# transformers, safetensors, pytest):
#
#     bash benchmarks/gpu_check.sh
#
# Steps, each logged to $GPU_CHECK_OUT (default: $OUT if set, else /tmp/armorm_gpu_check):
#   0. preflight the driver version, the GPU and every CUDA toolkit found; picks the newest one
#                the driver runs (CUDA 13 needs driver >= 580; CUDA 12.x runs on >= 525 for sm_90)
#                and exports CUDA_HOME for it; installs the matching cuBLAS wheel when missing
#                (nvidia-cublas for 13, nvidia-cublas-cu12 for 12)
#   1. build     the extension in place with the CUDA backend (ARMORM_REQUIRE_CUDA=1: no silent CPU-only build)
#   1b. emulation (on the CPU, beside the build) every kernel under the CPU emulation vs its reference
#   2. kernels   benchmarks/cuda harnesses: each kernel against its CPU reference on the GPU, then timed
#   3. tests     tests/test_cuda_build.py and tests/test_cuda_parity.py (device_map="cuda" vs transformers, same GPU)
#   4. bench     benchmarks/gpu_bench.py: 8B-shaped bf16 checkpoint, tokens/s and MFU vs transformers
# A failing step does not stop the later ones (the numbers still come); the exit code is non-zero if any failed.
# The step table is printed at the end whatever happens (also on Ctrl-C or a kill), then the benchmark table.
#
# Environment: PYTHON (default python3), BENCH_N (conversations timed, default 128),
# GPU_CHECK_OUT (log folder).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOG=${GPU_CHECK_OUT:-${OUT:-${TMPDIR:-/tmp}/armorm_gpu_check}}
mkdir -p "$LOG"
export PYTHONUNBUFFERED=1
JOBS=$(nproc 2>/dev/null || echo 4)

declare -a NAMES STATUS SECS
FAILED=0

record() {  # record NAME RC SECONDS
    NAMES+=("$1")
    SECS+=("$3")
    if [ "$2" -eq 0 ]; then STATUS+=("ok"); else STATUS+=("FAILED (exit $2)"); FAILED=1; fi
}

step() {  # step NAME TIMEOUT_S COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*"
    local t0=$SECONDS rc
    timeout "$limit" "$@" > >(tee "$LOG/$name.log") 2>&1
    rc=$?
    record "$name" "$rc" $((SECONDS - t0))
    return 0
}

summary() {
    echo
    echo "gpu_check summary ($(head -1 "$LOG/gpu.txt" 2>/dev/null))"
    printf '%-10s %-28s %6s\n' step status seconds
    for i in "${!NAMES[@]}"; do printf '%-10s %-28s %6s\n' "${NAMES[$i]}" "${STATUS[$i]}" "${SECS[$i]}"; done
    grep -E "passed|failed|error" "$LOG/tests.log" 2>/dev/null | tail -1 || true
    # the benchmark's own table, last
    awk '/^GPU benchmark:/{p=1} p' "$LOG/bench.log" 2>/dev/null || true
}
trap summary EXIT
trap 'echo "interrupted"; exit 130' INT TERM

# ---- 0. preflight: driver, GPU, toolkit ----
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee "$LOG/gpu.txt" || true
t0=$SECONDS
"$PY" build_tools/cuda_build.py preflight --env-file "$LOG/toolkit.env" 2>&1 | tee "$LOG/preflight.log"
rc=${PIPESTATUS[0]}
if [ -s "$LOG/toolkit.env" ]; then
    # shellcheck disable=SC1091
    . "$LOG/toolkit.env"
    if [ -n "${ARMORM_PIP_CUBLAS:-}" ]; then
        echo "installing $ARMORM_PIP_CUBLAS (the cuBLAS of the chosen toolkit's major version)" | tee -a "$LOG/preflight.log"
        timeout 180 "$PY" -m pip install -q "$ARMORM_PIP_CUBLAS" 2>&1 | tee -a "$LOG/preflight.log" || rc=1
    fi
fi
record preflight "$rc" $((SECONDS - t0))

# ---- 1. build, with the emulation suite on the CPU beside it ----
( timeout 200 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda_emulation.py tests/test_cuda_toolkit.py \
      > "$LOG/emulation.log" 2>&1; echo $? > "$LOG/emulation.rc" ) &
EMU_PID=$!
EMU_T0=$SECONDS
step build 240 env ARMORM_REQUIRE_CUDA=1 "$PY" setup.py -q build_ext --inplace -j "$JOBS"
if ! "$PY" -c "from armorm import _core; import sys; sys.exit(0 if getattr(_core, 'CUDA_BUILT', 0) and _core.cuda_device_count() > 0 else 1)"; then
    { echo "armorm._core was not built with the CUDA backend, or sees no GPU:";
      "$PY" -c "from armorm import _core; print('CUDA_BUILD_REASON:', getattr(_core, 'CUDA_BUILD_REASON', '?')); print('devices:', _core.cuda_device_count())"; } 2>&1 | tee -a "$LOG/build.log"
    STATUS[${#STATUS[@]}-1]="FAILED (no CUDA in _core)"
    FAILED=1
fi
wait "$EMU_PID"
record emulation "$(cat "$LOG/emulation.rc" 2>/dev/null || echo 1)" $((SECONDS - EMU_T0))
tail -3 "$LOG/emulation.log"

# ---- 2-4. on the GPU ----
step kernels 120 make -C benchmarks/cuda -j "$JOBS" PYTHON="$PY" run
# (test_cuda_build's harness build and CPU smoke run of gpu_bench are skipped: steps 2 and 4 do them for real)
step tests 150 "$PY" -m pytest -q -p no:cacheprovider -rs -k "not harnesses_build and not smoke" \
    tests/test_cuda_build.py tests/test_cuda_parity.py
step bench 240 "$PY" benchmarks/gpu_bench.py --n "${BENCH_N:-128}" --json "$LOG/gpu_bench.json"

exit $FAILED
