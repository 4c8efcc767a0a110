"""The cost of Ray: 2 actors x 1 thread (armorm.ray on a local Ray instance) against 1 process x 2 threads.

    python benchmarks/ray_overhead.py [--shape 1b|small] [--rows N] [--tokens T] [--batch-rows B] [--reps R]

Both sides score the same rows with the same checkpoint and the same two
cores' worth of threads, and must agree bit for bit. One process:
`ArmoRMPipeline(num_threads=2)` loads the model, then `score_batch` scores
every row. Ray: `armorm.ray.score_dataset(..., actors=2,
threads_per_actor=1)` over a Dataset of the rows, executed to Arrow tables
on the driver; each run starts its 2 actors, which load the model, so the
job's wall time is compared with load + scoring in one process. Ray's own
start (`ray.init`, once per session) is reported apart. Medians of --reps
runs after one warm-up run of each.

The checkpoint is a random ArmoRM (`armorm.tiny.make_tiny_model`) of the
named shape: `1b` is Llama-3.2-1B's backbone (hidden 2048, 16 layers, 32
heads, 8 KV heads, MLP 8192) with the toy byte-level tokenizer, so its
vocabulary is 262 tokens instead of 128256 (only the embedding lookup
differs: the per-token compute is the 1B model's); about 4 GB on disk
(float32), held in bf16. Cached under --cache-dir.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402

SHAPES = {
    # hidden, layers, heads, kv_heads, intermediate (make_tiny_model's arguments)
    "small": dict(hidden=512, layers=4, heads=8, kv_heads=2, intermediate=1536),
    "1b": dict(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192),
}



def checkpoint(cache: Path, shape: str) -> Path:
    from armorm.tiny import make_tiny_model
    d = cache / f"ray-armorm-{shape}"
    if not (d / "config.json").exists():
        print(f"generating {d}", flush=True)
        make_tiny_model(d, gating_hidden=64, **SHAPES[shape])
    return d


def conversations(n: int, tokens: int, seed: int = 0):
    """`n` distinct chats of about `tokens` tokens each (the toy tokenizer: one token per byte)."""
    rng = np.random.default_rng(seed)
    words = "the a of to and in is it for on with as at by from river mountain city book idea plan".split()

    def text(k: int) -> str:
        s = ""
        while len(s) < k:
            s += str(rng.choice(words)) + " "
        return s[:k].strip() + "."

    body = max(8, tokens - 40)  # the chat template adds about 40 tokens
    return [[{"role": "user", "content": text(body // 3)}, {"role": "assistant", "content": text(body - body // 3)}]
            for _ in range(n)]


def timed_runs(fn, reps: int):
    """Wall times of `reps` calls of `fn` after a warm-up call, and the calls' results."""
    fn()
    times, outs = [], []
    for _ in range(reps):
        t = time.perf_counter()
        outs.append(fn())
        times.append(time.perf_counter() - t)
    return times, outs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b", help="checkpoint shape")
    ap.add_argument("--rows", type=int, default=16, help="conversations scored per run")
    ap.add_argument("--tokens", type=int, default=512, help="tokens per conversation (about)")
    ap.add_argument("--batch-rows", type=int, default=4, help="rows per Ray Data batch")
    ap.add_argument("--reps", type=int, default=3, help="timed runs of each side (after a warm-up run)")
    ap.add_argument("--dtype", default="bfloat16", help="dtype the weights are held in")
    ap.add_argument("--cache-dir", type=Path,
                    default=Path(os.environ.get("ARMORM_BENCH_CACHE", Path.home() / ".cache" / "armorm-bench")))
    args = ap.parse_args()
    if min(args.rows, args.tokens, args.batch_rows, args.reps) < 1:
        ap.error("--rows, --tokens, --batch-rows and --reps must be >= 1")
    import logging
    import pyarrow as pa
    import ray
    import armorm.ray as ar
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    from armorm import ArmoRMPipeline

    model = checkpoint(args.cache_dir, args.shape)
    convs = conversations(args.rows, args.tokens)
    table = pa.Table.from_pylist([{"id": i, "messages": c} for i, c in enumerate(convs)])

    def one_process():
        rm = ArmoRMPipeline(str(model), device_map="cpu", torch_dtype=args.dtype, num_threads=2)
        t = time.perf_counter()
        out = rm.score_batch(convs)
        return out, time.perf_counter() - t

    times, outs = timed_runs(one_process, args.reps)
    t_one, scoring, ref = statistics.median(times), statistics.median(o[1] for o in outs), outs[-1][0]
    n_tokens = sum(len(s) for s in ArmoRMPipeline(str(model), device_map="cpu").encode(convs))

    os.environ["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parent.parent)] +
                                               [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    t = time.perf_counter()
    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    t_init = time.perf_counter() - t
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        def on_ray():
            ds = ar.score_dataset(ray.data.from_arrow(table), model, actors=2, threads_per_actor=1,
                                  batch_rows=args.batch_rows, dtype=args.dtype)
            return pa.concat_tables(ray.get(ds.to_arrow_refs()))

        times, outs = timed_runs(on_ray, args.reps)
        t_ray, got = statistics.median(times), outs[-1]
    finally:
        ray.shutdown()
    same = got["id"].to_pylist() == list(range(args.rows)) and \
        np.array_equal(got["score"].to_numpy().view(np.uint32), np.asarray(ref.score, np.float32).view(np.uint32))

    dims = ", ".join(f"{k} {v}" for k, v in SHAPES[args.shape].items())
    print(f"\nray overhead: {args.shape}-shaped ArmoRM ({dims}), {args.dtype} weights, {args.rows} rows x "
          f"~{args.tokens} tokens ({n_tokens} tokens), Ray batches of {args.batch_rows} rows, ray {ray.__version__}")
    print(f"{describe()}; medians of {args.reps} runs\n")
    rows = [("1 process x 2 threads: load + score", t_one, n_tokens / t_one),
            ("  of which scoring", scoring, n_tokens / scoring),
            ("Ray, 2 actors x 1 thread: job (actors start, load, score, collect)", t_ray, n_tokens / t_ray)]
    print(f"{'':<70} {'seconds':>9} {'tokens/s':>10}")
    for name, sec, rate in rows:
        print(f"{name:<70} {sec:>9.3f} {rate:>10.1f}")
    print(f"\nRay job / one process (load + score): {t_ray / t_one:.3f}x  "
          f"(overhead {100 * (t_ray / t_one - 1):+.1f}%)")
    print(f"ray.init (once per session, not in the job): {t_init:.2f} s")
    print(f"results identical bit for bit, in input order: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
