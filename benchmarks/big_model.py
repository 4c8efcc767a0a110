"""Large models on a small machine: load time, peak RSS and prefill speed of an 8B-shaped checkpoint.

    flock /tmp/armorm-bench.lock python benchmarks/big_model.py [--dir /work/bigckpt] [--shape 8b]
        [--threads 2] [--reps 3] [--prefill-reps 2] [--score-reps 5] [--no-fp32] [--no-prefill]
        [--prepack-checkpoint bf16|fp32]

Uses DIR/<shape>-bf16 and DIR/<shape>-fp32 (random ArmoRM-shaped checkpoints
with the same values, written by benchmarks/make_checkpoint.py when missing:
16 GB and 32 GB for 8b). Every figure comes from a fresh Python process that
imports only armorm (no torch), so RSS is the model's, not the harness's.
Every row but the prepacking comparison loads as `armorm score` and the other
batch jobs do (armorm.model.PREPACK_FOR_BATCH_JOBS: not prepacked):

- from_pretrained wall time with a warm page cache (the files read once and
  one untimed load first, then the median of --reps processes), with the
  NaN/inf scan (the default) and with check_finite=False;
- load + scoring one 16-token conversation: wall time (median of --reps) and
  peak RSS (VmHWM, which counts the file pages of the mapped checkpoint that
  the process has touched, as well as its own memory);
- prepacked weights (docs/model.md, 'Prepacked weights') off and on (auto,
  the library's and `armorm serve`'s default): load time, peak RSS, the
  first 16-token call and the median of --score-reps more (a lone short
  request: a read of every weight), the packed bytes (0 where auto does not
  apply: bf16 weights on a CPU without AVX512_BF16), and the scores, which
  must be equal bit for bit. Which checkpoint: --prepack-checkpoint (fp32
  is held as stored, in fp32: prepacked on every SIMD path);
- prefill of 2 sequences of 512 tokens (after a 16-token warm-up call): tokens/s;
- the fp32 checkpoint loaded with torch_dtype=bfloat16: load time, peak RSS
  (well under the 32 GB of fp32 weights means the fp32 copy was never held)
  and the 16-token score, which must equal the bf16 checkpoint's bit for bit.

Prints a table of goals vs medians, with the load average and free memory.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parents[1]
GB = 1e9
#: A Llama-3 chat conversation of 16 tokens, ending with the assistant's turn (holds the gating pattern).
CONVERSATION = [128000, 128006, 882, 128007, 271, 9906, 0, 128009, 128006, 78191, 128007, 271, 13347, 1070, 0,
                128009]
GATING = [128009, 128006, 78191, 128007, 271]


def proc_status() -> Dict[str, int]:
    """VmHWM, VmRSS, RssAnon, RssFile of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[k] = int(v.split()[0]) * 1024
    return out


def long_sequences(n: int, length: int, vocab: int = 128256) -> List[List[int]]:
    """n random conversations of `length` tokens whose last turn opens with the gating pattern."""
    import numpy as np
    rng = np.random.default_rng(0)
    seqs = []
    for _ in range(n):
        s = rng.integers(0, 128000, size=length)
        s[0] = 128000
        s[length - 64:length - 64 + len(GATING)] = GATING
        s[-1] = 128009
        seqs.append(s.tolist())
    return seqs


def child(task: str, path: str, threads: int, dtype: str, prefill_reps: int, prepack: str,
          score_reps: int) -> Dict[str, Any]:
    """One measurement in this (fresh) process."""
    t_import = time.perf_counter()
    sys.path.insert(0, str(ROOT))
    import armorm
    out: Dict[str, Any] = {"import_s": time.perf_counter() - t_import}
    kw: Dict[str, Any] = {"num_threads": threads}
    if dtype != "auto":
        kw["torch_dtype"] = dtype
    if task == "load_nocheck":
        kw["check_finite"] = False
    kw["prepack"] = armorm.model.PREPACK_SETTINGS[prepack]
    t0 = time.perf_counter()
    model = armorm.ArmoRM.from_pretrained(path, **kw)
    out["load_s"] = time.perf_counter() - t0
    out["after_load"] = proc_status()
    out["dtype"] = model.dtype
    out["prepacked_bytes"] = model.prepacked_bytes
    if task in ("score16", "prefill"):
        t1 = time.perf_counter()
        r = model([CONVERSATION])
        out["score16_s"] = time.perf_counter() - t1
        out["load_score16_s"] = time.perf_counter() - t0
        out["score"] = float(r.score[0])
        out["score_hex"] = r.score[0].item().hex()
        warm = []
        for _ in range(score_reps if task == "score16" else 0):
            t = time.perf_counter()
            model([CONVERSATION])
            warm.append(time.perf_counter() - t)
        out["score16_warm_s"] = warm
    if task == "prefill":
        seqs = long_sequences(2, 512)
        times = []
        for _ in range(prefill_reps):
            t = time.perf_counter()
            r = model.score_sequences(seqs)
            times.append(time.perf_counter() - t)
        out["prefill_s"] = times
        out["prefill_tokens"] = sum(len(s) for s in seqs)
        out["prefill_finite"] = all(math.isfinite(v) for v in r.score.tolist())
    out["end"] = proc_status()
    model.close()
    return out


def run_child(task: str, path: Path, args: argparse.Namespace, dtype: str = "auto",
              prepack: str = "auto") -> Dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", task, "--path", str(path), "--threads", str(args.threads),
           "--child-dtype", dtype, "--prefill-reps", str(args.prefill_reps), "--child-prepack", prepack,
           "--score-reps", str(args.score_reps)]
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"{task} on {path} failed ({p.returncode}):\n{p.stderr[-4000:]}")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res["process_s"] = wall
    print(f"  {task:<13} {path.name:<10} dtype {res['dtype']:<9} prepack {prepack:<4} "
          f"({res['prepacked_bytes'] / GB:5.2f} GB) load {res['load_s']:6.2f} s"
          + (f"  load+score16 {res['load_score16_s']:6.2f} s" if "load_score16_s" in res else "")
          + (f"  score16 {res['score16_s'] * 1e3:.1f} ms, then median "
             f"{statistics.median(res['score16_warm_s']) * 1e3:.1f} ms" if res.get("score16_warm_s") else "")
          + (f"  prefill {', '.join(f'{x:.1f}' for x in res['prefill_s'])} s" if "prefill_s" in res else "")
          + f"  peak RSS {res['end']['VmHWM'] / GB:5.2f} GB  (process {wall:.1f} s)", flush=True)
    return res


def read_files(d: Path) -> float:
    """Reads every shard once (into the page cache, where RAM allows); returns the seconds it took."""
    t = time.perf_counter()
    buf = bytearray(16 << 20)
    for p in sorted(d.glob("*.safetensors")):
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return time.perf_counter() - t


def ensure_checkpoint(d: Path, shape: str, dtype: str) -> Path:
    if not (d / "config.json").exists():
        print(f"generating {d} ...", flush=True)
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "make_checkpoint.py"), str(d), "--shape", shape,
                        "--dtype", dtype], check=True)
    return d


def machine() -> str:
    from machine import describe  # this directory's machine.py (not the function)
    avail = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    return f"{describe()}, MemAvailable {avail / GB:.1f} GB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/work/bigckpt", help="where the checkpoints are (or are generated)")
    ap.add_argument("--shape", default="8b", help="a shape of make_checkpoint.py (8b, 1b, small, tiny)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3, help="processes per timed figure (median)")
    ap.add_argument("--prefill-reps", type=int, default=2, help="timed 2x512 calls (median)")
    ap.add_argument("--no-fp32", action="store_true", help="skip the fp32 checkpoint")
    ap.add_argument("--no-prefill", action="store_true", help="skip the 2x512 prefill")
    ap.add_argument("--score-reps", type=int, default=5, help="16-token calls after the first, per process (median)")
    ap.add_argument("--prepack-checkpoint", choices=["bf16", "fp32"], default="bf16",
                    help="the checkpoint (held as stored) of the prepack off / on comparison")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--child-dtype", default="auto", help=argparse.SUPPRESS)
    ap.add_argument("--child-prepack", default="auto", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.path, args.threads, args.child_dtype, args.prefill_reps,
                               args.child_prepack, args.score_reps)))
        return 0

    sys.path.insert(0, str(ROOT))
    from armorm.model import PREPACK_FOR_BATCH_JOBS, PREPACK_SETTINGS
    root = Path(args.dir)
    bf16 = ensure_checkpoint(root / f"{args.shape}-bf16", args.shape, "bf16")
    fp32 = None if args.no_fp32 and args.prepack_checkpoint != "fp32" else \
        ensure_checkpoint(root / f"{args.shape}-fp32", args.shape, "fp32")
    size = lambda d: sum(p.stat().st_size for p in d.glob("*.safetensors")) / GB  # noqa: E731
    print(f"start: {machine()}")
    print(f"{bf16}: {size(bf16):.2f} GB" + (f"; {fp32}: {size(fp32):.2f} GB" if fp32 else ""))
    print(f"armorm, {args.threads} threads; each line is one fresh process", flush=True)

    warm_s = read_files(bf16)
    print(f"read {bf16.name} in {warm_s:.1f} s (page cache as found)", flush=True)
    # these rows load as the batch jobs do (armorm score: armorm.model.PREPACK_FOR_BATCH_JOBS, off);
    # the prepack rows below compare off with the library's default
    batch = {v: k for k, v in PREPACK_SETTINGS.items()}[PREPACK_FOR_BATCH_JOBS]
    first = run_child("load", bf16, args, prepack=batch)  # page cache warm now (where RAM allows), not timed
    loads = [run_child("load", bf16, args, prepack=batch) for _ in range(args.reps)]
    nochecks = [run_child("load_nocheck", bf16, args, prepack=batch) for _ in range(args.reps)]
    scores = [run_child("score16", bf16, args, prepack=batch) for _ in range(args.reps)]
    prefill = None if args.no_prefill else run_child("prefill", bf16, args, prepack=batch)
    fp = run_child("score16", fp32, args, dtype="bfloat16", prepack=batch) if fp32 and not args.no_fp32 else None
    pp_ckpt = fp32 if args.prepack_checkpoint == "fp32" else bf16
    if pp_ckpt != bf16:
        read_files(pp_ckpt)
        run_child("load", pp_ckpt, args, prepack="off")  # page cache warm, untimed
    # interleaved, so that a change in the machine's load hits both alike
    pp = {"off": [], "auto": []}
    for _ in range(args.reps):
        for mode in pp:
            pp[mode].append(run_child("score16", pp_ckpt, args, prepack=mode))
    end_machine = machine()
    print(f"end: {end_machine}")

    med = lambda xs: statistics.median(xs)  # noqa: E731
    rows = []

    def row(name: str, goal: str, value: str, ok: Any) -> None:
        rows.append((name, goal, value, "-" if ok is None else ("yes" if ok else "NO")))

    load_s = med([r["load_s"] for r in loads])
    row("from_pretrained, warm cache (NaN/inf scan on)", "<= 3 s", f"{load_s:.2f} s", load_s <= 3)
    row("  warm-up load (after reading the files once)", "-", f"{first['load_s']:.2f} s", None)
    nc = med([r["load_s"] for r in nochecks])
    row("from_pretrained, check_finite=False", "-", f"{nc:.3f} s", None)
    ls = med([r["load_score16_s"] for r in scores])
    row("load + score 16-token conversation", "<= 6 s", f"{ls:.2f} s", ls <= 6)
    row("  of which the scoring call", "-", f"{med([r['score16_s'] for r in scores]):.2f} s", None)
    hwm = max(r["end"]["VmHWM"] for r in scores)
    row("peak RSS, load + score 16 tokens (VmHWM)", "<= 17.5 GB", f"{hwm / GB:.2f} GB", hwm <= 17.5 * GB)
    e = scores[0]["end"]
    row("  file pages / anonymous at the end", "-", f"{e['RssFile'] / GB:.2f} / {e['RssAnon'] / GB:.2f} GB", None)
    if prefill:
        t = med(prefill["prefill_s"])
        row(f"prefill 2 x 512 tokens, {args.threads} threads", "reported",
            f"{prefill['prefill_tokens'] / t:.1f} tok/s ({t:.1f} s)", prefill["prefill_finite"])
        ph = prefill["end"]["VmHWM"]
        row("peak RSS, load + 2 x 512 prefill", "<= 17.5 GB", f"{ph / GB:.2f} GB", ph <= 17.5 * GB)
    if fp:
        fh = fp["end"]["VmHWM"]
        row("fp32 checkpoint as bf16: from_pretrained", "-", f"{fp['load_s']:.1f} s", None)
        row("fp32 checkpoint as bf16: peak RSS (load + score)", "<= 17.5 GB, << 32 GB", f"{fh / GB:.2f} GB",
            fh <= 17.5 * GB)
        same = fp["score_hex"] == scores[0]["score_hex"]
        row("fp32-as-bf16 score == bf16 score (bitwise)", "equal", f"{fp['score']:.6f} vs {scores[0]['score']:.6f}",
            same)
    off, auto = pp["off"], pp["auto"]
    name = f"{pp_ckpt.name} as stored"
    packed = auto[0]["prepacked_bytes"]
    row(f"prepacked weights, {name} (auto)", "-",
        f"{packed / GB:.2f} GB" if packed else "not applied (0 bytes)", None)
    for mode, rs in (("off", off), ("auto", auto)):
        row(f"  prepack {mode}: from_pretrained (scan on)", "-", f"{med([r['load_s'] for r in rs]):.2f} s", None)
    for mode, rs in (("off", off), ("auto", auto)):
        row(f"  prepack {mode}: peak RSS, load + score", "-", f"{max(r['end']['VmHWM'] for r in rs) / GB:.2f} GB",
            None)
    for mode, rs in (("off", off), ("auto", auto)):
        row(f"  prepack {mode}: first 16-token call", "-", f"{med([r['score16_s'] for r in rs]) * 1e3:.1f} ms", None)
    # (with --score-reps 0, the first calls)
    warm = {mode: med([x for r in rs for x in r["score16_warm_s"]] or [r["score16_s"] for r in rs])
            for mode, rs in (("off", off), ("auto", auto))}
    for mode in warm:
        row(f"  prepack {mode}: 16-token call, later calls", "-", f"{warm[mode] * 1e3:.1f} ms", None)
    row("  16-token call, prepack off / auto", "reported", f"{warm['off'] / warm['auto']:.2f}x", None)
    same = len({r["score_hex"] for r in off + auto}) == 1
    row("  score, prepack off == auto (bitwise)", "equal", f"{off[0]['score']:.6f} vs {auto[0]['score']:.6f}", same)
    w = max(len(r[0]) for r in rows)
    print(f"\n{args.shape} ({size(bf16):.1f} GB bf16), median of {args.reps} processes; {end_machine}")
    print(f"{'figure':<{w}}  {'goal':<22} {'measured':<28} pass")
    for name, goal, value, ok in rows:
        print(f"{name:<{w}}  {goal:<22} {value:<28} {ok}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
