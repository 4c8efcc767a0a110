#!/usr/bin/env bash
# gpu_check.sh: everything that needs a GPU, in one run (<= 5 minutes on an H100).
#
# Run from anywhere on a machine with an NVIDIA GPU (sm_90), nvcc, cuBLAS and a
# python that has the test dependencies (torch with CUDA, transformers,
# safetensors, pytest):
#
#     bash benchmarks/gpu_check.sh
#
# Steps, each logged to $GPU_CHECK_OUT (default: $OUT if set, else /tmp/armorm_gpu_check):
#   1. build     the extension in place with the CUDA backend (ARMORM_REQUIRE_CUDA=1: no silent CPU-only build)
#   2. kernels   benchmarks/cuda harnesses: each kernel against its CPU reference, then timed
#   3. tests     tests/test_cuda_build.py and tests/test_cuda_parity.py (device_map="cuda" vs transformers, same GPU)
#   4. bench     benchmarks/gpu_bench.py: 8B-shaped bf16 checkpoint, tokens/s and MFU vs transformers
#   5. bestofn   benchmarks/best_of_n.py on the GPU: 1B-shaped checkpoint, N responses per prompt and pairs,
#                shared prefixes vs not vs transformers (the parity of shared prefixes is in step 3)
# A failing step does not stop the later ones (the numbers still come); the exit code is non-zero if any failed.
# The last lines printed are the step table and the benchmark table.
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

step() {  # step NAME TIMEOUT_S COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*"
    local t0=$SECONDS rc
    timeout "$limit" "$@" > >(tee "$LOG/$name.log") 2>&1
    rc=$?
    NAMES+=("$name")
    SECS+=($((SECONDS - t0)))
    if [ $rc -eq 0 ]; then STATUS+=("ok"); else STATUS+=("FAILED (exit $rc)"); FAILED=1; fi
    return 0
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee "$LOG/gpu.txt" || true

step build 240 env ARMORM_REQUIRE_CUDA=1 "$PY" setup.py -q build_ext --inplace -j "$JOBS"
if ! "$PY" -c "from armorm import _core; import sys; sys.exit(0 if getattr(_core, 'CUDA_BUILT', 0) and _core.cuda_device_count() > 0 else 1)"; then
    echo "armorm._core was not built with the CUDA backend, or sees no GPU" | tee -a "$LOG/build.log"
    STATUS[0]="FAILED (no CUDA in _core)"
    FAILED=1
fi
step kernels 120 make -C benchmarks/cuda -j "$JOBS" run
# (test_cuda_build's harness build and CPU smoke run of gpu_bench are skipped: steps 2 and 4 do them for real)
step tests 150 "$PY" -m pytest -q -p no:cacheprovider -rs -k "not harnesses_build and not smoke" \
    tests/test_cuda_build.py tests/test_cuda_parity.py
step bench 240 "$PY" benchmarks/gpu_bench.py --n "${BENCH_N:-128}" --json "$LOG/gpu_bench.json"
step bestofn 180 "$PY" benchmarks/best_of_n.py --device cuda --shape 1b --n 2,8,16 --prompts 8 --pairs 256 --reps 3 \
    --threads "$JOBS" --batch-tokens 16384 --cache-dir "$LOG/ckpt"

echo
echo "gpu_check summary ($(cat "$LOG/gpu.txt" 2>/dev/null | head -1))"
printf '%-8s %-22s %6s\n' step status seconds
for i in "${!NAMES[@]}"; do printf '%-8s %-22s %6s\n' "${NAMES[$i]}" "${STATUS[$i]}" "${SECS[$i]}"; done
grep -E "passed|failed|error" "$LOG/tests.log" | tail -1 || true
# the benchmarks' own tables, last
awk '/^best-of-N on/{p=1} p' "$LOG/bestofn.log" 2>/dev/null || true
awk '/^GPU benchmark:/{p=1} p' "$LOG/bench.log" 2>/dev/null || true
exit $FAILED
