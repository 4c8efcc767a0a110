"""Memory soak: score N batches with one model and report RSS after warm-up and at the end.

    PYTHONPATH=. python benchmarks/rss_soak.py [--batches 10000]

Uses a small random ArmoRM checkpoint (generated with transformers). Passes
when RSS at the end is within 5% of RSS after warm-up; prints a table and
exits non-zero otherwise.
"""
from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import armorm  # noqa: E402
from checkpoints import make_armorm  # noqa: E402


def rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=10000)
    ap.add_argument("--warmup", type=int, default=500)
    args = ap.parse_args()
    pattern = [5, 6, 7]
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        make_armorm(Path(tmp) / "m", hidden=64, heads=4, kv_heads=2, inter=128, layers=2)
        model = armorm.ArmoRM.from_pretrained(Path(tmp) / "m", gating_pattern=pattern)
        batches = []
        for _ in range(16):  # varied shapes, so allocations differ between calls
            seqs = []
            for _ in range(int(rng.integers(1, 6))):
                s = rng.integers(10, 300, size=int(rng.integers(5, 200)))
                s[0:3] = pattern
                seqs.append(s)
            batches.append(seqs)
        for i in range(args.warmup):
            model.score_sequences(batches[i % len(batches)])
        gc.collect()
        start, t0 = rss_kb(), time.perf_counter()
        samples = []
        for i in range(args.batches):
            model.score_sequences(batches[i % len(batches)])
            if i % max(1, args.batches // 10) == 0:
                samples.append(rss_kb())
        gc.collect()
        end = rss_kb()
        dt = time.perf_counter() - t0
    growth = (end - start) / start
    print(f"{'batches':>8} {'RSS after warm-up':>18} {'RSS at end':>11} {'max seen':>9} {'growth':>7} {'time':>7}")
    print(f"{args.batches:>8} {start:>15} kB {end:>8} kB {max(samples):>6} kB {growth:>+7.2%} {dt:>6.1f}s")
    return 0 if growth <= 0.05 else 1


if __name__ == "__main__":
    sys.exit(main())
