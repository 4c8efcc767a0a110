"""Stage-2 gating training speed on synthetic data (spec section 3 hyperparameters).

    python benchmarks/stage2_gating.py                 # 30 timed steps per BLAS setting, extrapolated to 2000
    python benchmarks/stage2_gating.py --steps 2000    # the full run

H = 4096, K = 19, 3 x 1024 hidden, batches of 1024 pairs, dropout 0.2,
AdamW; the same code path as `armorm train-stage2` (armorm.train.stage2
.train_gating), validation accuracy evaluated once at the end. Prints
seconds per step and the projected time of 2000 steps for each BLAS thread
setting (library default, 1, 2; the limits need threadpoolctl).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from armorm.train.stage2 import GatingConfig, train_gating  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--pairs", type=int, default=20000)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", nargs="+", default=["default", "1", "2"])
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    P = rng.standard_normal((args.pairs, args.hidden), dtype=np.float32)
    delta = rng.standard_normal((args.pairs, 19)).astype(np.float32)
    print(f"cpus {os.cpu_count()}, load average {os.getloadavg()}, H={args.hidden}, pairs={args.pairs}")
    for th in args.threads:
        threads = None if th == "default" else int(th)
        cfg = GatingConfig(steps=args.steps, eval_every=0)
        t = time.perf_counter()
        _, rep, _ = train_gating(P, delta, cfg, blas_threads=threads)
        secs = time.perf_counter() - t
        per = rep["seconds_per_step"]
        print(f"BLAS threads {th:>7}: {args.steps} steps in {secs:.1f} s, {per * 1e3:.0f} ms/step "
              f"-> 2000 steps: {per * 2000:.0f} s ({per * 2000 / 60:.1f} min)", flush=True)


if __name__ == "__main__":
    main()
