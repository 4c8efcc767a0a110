"""Per-field parity of armorm with transformers on tiny random ArmoRM checkpoints.

    PYTHONPATH=. python benchmarks/parity_report.py

Prints, for each output field, the normwise relative error
max|x - ref| / max|ref| (worst over the sequences) of
  - armorm on an fp32 checkpoint vs transformers fp32 (+ the head of docs/model.md);
  - on a bf16 checkpoint: armorm (bf16 weights, fp32 accumulation) and
    transformers' own bf16 run, both vs the fp32 computation on the same
    bf16 weights, and their ratio (the tests require <= 1.1).
"""
from __future__ import annotations

import copy
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import armorm  # noqa: E402
from checkpoints import make_armorm, reference_armorm_head  # noqa: E402

PATTERN = [5, 6, 7]
FIELDS = ["rewards", "gating_output", "score", "hidden_state", "prompt_embedding"]
SHAPE = dict(hidden=128, heads=8, kv_heads=2, inter=256, layers=4, rope_theta=500000.0)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def ref(tiny, ids, dtype):
    bb = copy.deepcopy(tiny.backbone).to(dtype)
    head = {k: v.to(dtype) for k, v in tiny.head.items()}
    with torch.no_grad():
        hs = bb(torch.tensor(ids[None])).last_hidden_state[0]
        out = reference_armorm_head(hs, len(ids) - 1, armorm.model.find_gating_position(ids, PATTERN), head, 10.0, 3)
    return {k: v.float().numpy() for k, v in out.items()}


def main():
    rng = np.random.default_rng(0)
    seqs = []
    for n in (17, 120, 333, 600):
        s = rng.integers(10, 300, size=n)
        g = n - 3 - n // 4
        s[g:g + 3] = PATTERN
        seqs.append(s)
    with tempfile.TemporaryDirectory() as tmp:
        t32 = make_armorm(Path(tmp) / "f32", **SHAPE)
        m32 = armorm.ArmoRM.from_pretrained(t32.path, gating_pattern=PATTERN)
        o32 = m32.score_sequences(seqs)
        tb = make_armorm(Path(tmp) / "bf16", dtype="bfloat16", **SHAPE)
        mb = armorm.ArmoRM.from_pretrained(tb.path, gating_pattern=PATTERN)
        ob = mb.score_sequences(seqs)
        print(f"tiny ArmoRM {SHAPE}, sequences of {[len(s) for s in seqs]} tokens, kernel path: "
              f"{getattr(mb._core, 'kernel', 'default')}")
        print(f"{'field':<18} {'fp32 err':>10} {'bf16 armorm':>12} {'bf16 HF':>10} {'ratio':>9}")
        for f in FIELDS:
            e32 = max(rel_err(o32[f][i], ref(t32, s, torch.float32)[f]) for i, s in enumerate(seqs))
            r32 = [ref(tb, s, torch.float32)[f] for s in seqs]
            eb = max(rel_err(ob[f][i], r32[i]) for i in range(len(seqs)))
            eh = max(rel_err(ref(tb, s, torch.bfloat16)[f], r32[i]) for i, s in enumerate(seqs))
            print(f"{f:<18} {e32:>10.2e} {eb:>12.2e} {eh:>10.2e} {eb / eh:>9.1e}")


if __name__ == "__main__":
    main()
