"""Stage-2 gating training speed on synthetic data (docs/stage2.md hyperparameters).

    python benchmarks/stage2_gating.py                  # 30 timed steps per backend, projected to 2000
    python benchmarks/stage2_gating.py --steps 2000 --backends auto    # the full run

H = 4096, K = 19, 3 x 1024 hidden, batches of 1024 pairs, dropout 0.2,
AdamW, prompt embeddings stored as bf16 (as prepare-stage2 writes them);
the same code path as `armorm train-stage2` (armorm.train.stage2
.train_gating), validation accuracy every 250 steps and at the end. Backends:
"core" (the C core's bf16 GEMMs + fused AdamW) and "numpy" (float32 BLAS).
Prints seconds per step, the time of 2000 steps (measured or projected) and
the goal (2000 steps in <= 300 s). One process, one machine.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from armorm.safetensors_io import float32_to_bf16  # noqa: E402
from armorm.train.stage2 import GatingConfig, train_gating  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--pairs", type=int, default=20000)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--backends", nargs="+", default=["core", "numpy"])
    ap.add_argument("--threads", type=int, default=None, help="threads (default: every core)")
    ap.add_argument("--eval-every", type=int, default=250, help="validation every N steps (train-stage2's default)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    P = float32_to_bf16(rng.standard_normal((args.pairs, args.hidden), dtype=np.float32))
    delta = rng.standard_normal((args.pairs, 19)).astype(np.float32)
    print(f"cpus {os.cpu_count()}, load average {tuple(round(x, 2) for x in os.getloadavg())}, "
          f"H={args.hidden}, pairs={args.pairs}, steps={args.steps}")
    print(f"{'backend':<10} {'matmul':<10} {'ms/step':>8} {'2000 steps (s)':>15} {'goal 300 s':>11} {'val acc':>8}")
    for be in args.backends:
        cfg = GatingConfig(steps=args.steps, eval_every=args.eval_every, backend=be)
        t = time.perf_counter()
        _, rep, _ = train_gating(P, delta, cfg, blas_threads=args.threads)
        per = rep["seconds_per_step"]
        total = per * 2000
        kind = "measured" if args.steps == 2000 else "projected"
        print(f"{be:<10} {rep['matmul']:<10} {per * 1e3:8.0f} {total:9.0f} {kind[:5]:>5} "
              f"{'met' if total <= 300 else 'NOT met':>11} {rep['val_accuracy'] * 100:7.2f}%  "
              f"(wall {time.perf_counter() - t:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
