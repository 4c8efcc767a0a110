"""CPU prefill throughput: armorm vs transformers (torch CPU, sdpa), same checkpoint, same tokens.

    python benchmarks/cpu_prefill.py [--shape small|1b] [--threads N] [--reps R]

Generates a random Llama checkpoint of the named shape (bf16 and fp32), scores
the same packed token ids with armorm and with transformers' forward (no
padding: one sequence per forward call for transformers too, which favours
it), and prints median tokens/s and the ratio. One process, one machine.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SHAPES = {
    # hidden, layers, heads, kv_heads, intermediate, vocab
    "small": dict(hidden=512, layers=4, heads=8, kv_heads=2, inter=1536, vocab=32000),
    "medium": dict(hidden=1024, layers=8, heads=16, kv_heads=4, inter=3584, vocab=32000),
    "1b": dict(hidden=2048, layers=16, heads=32, kv_heads=8, inter=8192, vocab=128256),
}


def make_checkpoint(root: Path, shape: dict, dtype: str) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaModel
    d = root / f"llama-{dtype}"
    if (d / "config.json").exists():
        return d
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
                      num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
                      intermediate_size=shape["inter"], vocab_size=shape["vocab"], max_position_embeddings=8192,
                      rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    with torch.device("cpu"):
        model = LlamaModel(cfg).to(getattr(torch, dtype))
    model.save_pretrained(d, safe_serialization=True)
    return d


def timeit(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="medium")
    ap.add_argument("--seqs", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    args = ap.parse_args()

    import torch
    from transformers import LlamaModel
    import armorm

    torch.set_num_threads(args.threads)
    shape = SHAPES[args.shape]
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, shape["vocab"], size=args.seq_len).astype(np.int32) for _ in range(args.seqs)]
    ntok = sum(len(s) for s in seqs)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in args.dtypes.split(","):
            d = make_checkpoint(Path(tmp), shape, dtype)
            ours = armorm.ArmoRM.from_pretrained(d, num_threads=args.threads)
            t_ours = timeit(lambda: ours.score_sequences(seqs, fields=["hidden_state"]), args.reps)
            ours.close()
            hf = LlamaModel.from_pretrained(d, dtype=getattr(torch, dtype), attn_implementation="sdpa").eval()

            def run_hf():
                with torch.no_grad():
                    for s in seqs:
                        hf(torch.from_numpy(s.astype(np.int64))[None])
            t_hf = timeit(run_hf, args.reps)
            del hf
            rows.append((dtype, ntok / t_ours, ntok / t_hf))
    print(f"\nshape {args.shape} {shape}, {args.seqs} x {args.seq_len} tokens, {args.threads} threads, "
          f"median of {args.reps}")
    print(f"{'dtype':<10} {'armorm tok/s':>14} {'transformers tok/s':>20} {'ratio':>8}")
    for dtype, a, b in rows:
        print(f"{dtype:<10} {a:>14.1f} {b:>20.1f} {a / b:>7.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
