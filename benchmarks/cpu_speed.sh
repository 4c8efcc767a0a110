#!/usr/bin/env bash
# cpu_speed.sh: every CPU-speed benchmark of issue 7 in one command, from a fresh checkout.
#
#   pip install torch==2.13.0 && pip install -e ".[test]" && bash benchmarks/cpu_speed.sh
#
# 1. kernel harness: correctness of every matmul path, the measured vdpbf16ps and
#    fp32 FMA peaks, GEMM GFLOP/s and the fraction of peak (benchmarks/kernels);
# 2. llama-cpp-python compiled from its PyPI source when it is not installed
#    (30-60 min on 2 cores; SKIP_LLAMACPP=1 skips llama.cpp entirely);
# 3. Llama-3.2-1B-shaped prefill, 8 x 512 tokens: armorm vs transformers vs
#    llama.cpp, bf16 and fp32 (benchmarks/cpu_prefill.py);
# 4. where the time goes: FLOPs per token, % of peak, perf and torch.profiler
#    breakdowns (benchmarks/prefill_profile.py; the perf part needs `perf`);
# 5. the 8B shape: load time, peak RSS, 16-token load + score, 2 x 512 prefill,
#    and a 30 GB fp32 checkpoint loaded as bf16 (benchmarks/big_model.py);
# 6. the other families: Qwen3-0.6B and Gemma-2-2B shapes, bf16, 8 x 512 tokens,
#    armorm vs transformers' Qwen3Model / Gemma2Model (SKIP_FAMILIES=1 skips).
#
# Disk: ~15 GB for the 1B checkpoints and GGUF files (~/.cache/armorm-bench),
# ~6.5 GB for the family shapes (bf16),
# ~46 GB for the 8B ones (BIG_DIR, default /work/bigckpt; BIG_ARGS=--no-fp32
# skips the 30 GB fp32 one). Threads: THREADS (default 2). SHAPE (default 1b;
# small/medium for a quick smoke run: llama.cpp needs the 1b vocabulary). Run
# it on an otherwise idle machine: every table is medians from this one run.
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${THREADS:-2}
SHAPE=${SHAPE:-1b}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python -c "import armorm._core" 2>/dev/null || python setup.py build_ext --inplace

echo "== 1. matrix kernels =="
make -s -C benchmarks/kernels run THREADS="$THREADS"

LLAMA=auto
if [ -n "${SKIP_LLAMACPP:-}" ]; then
  LLAMA=off
elif ! python -c "import llama_cpp" 2>/dev/null; then
  echo "== building llama-cpp-python from source (once) =="
  python benchmarks/llamacpp.py build
fi

echo "== 3. $SHAPE-shaped prefill: armorm vs transformers vs llama.cpp =="
python benchmarks/cpu_prefill.py --shape "$SHAPE" --prepare-only --llamacpp "$LLAMA"
python benchmarks/cpu_prefill.py --shape "$SHAPE" --seqs 8 --seq-len 512 --reps 1 --threads "$THREADS" --llamacpp "$LLAMA"

echo "== 4. where the time goes =="
for dt in bfloat16 float32; do
  python benchmarks/prefill_profile.py --shape "$SHAPE" --dtype "$dt" --threads "$THREADS"
done

echo "== 5. the 8B shape =="
python benchmarks/big_model.py --dir "${BIG_DIR:-/work/bigckpt}" --threads "$THREADS" ${BIG_ARGS:-}

if [ -z "${SKIP_FAMILIES:-}" ]; then
  echo "== 6. Qwen3-0.6B and Gemma-2-2B shapes: armorm vs transformers =="
  for fam in qwen3-0.6b gemma2-2b; do
    python benchmarks/cpu_prefill.py --shape "$fam" --prepare-only --dtypes bfloat16
    python benchmarks/cpu_prefill.py --shape "$fam" --seqs 8 --seq-len 512 --reps 1 --threads "$THREADS" \
        --dtypes bfloat16
  done
fi
