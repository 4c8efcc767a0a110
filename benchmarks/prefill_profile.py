"""Where CPU prefill time goes: FLOPs per token, this machine's measured peak, and profiles of armorm and transformers.

    python benchmarks/prefill_profile.py --shape 1b --dtype bfloat16
    python benchmarks/prefill_profile.py --shape 1b --dtype float32
    (timings to report: flock /tmp/armorm-bench.lock python benchmarks/prefill_profile.py ...)

One run, one machine, same checkpoint and tokens as benchmarks/cpu_prefill.py
(its cached random Llama checkpoint under --cache-dir, its token ids: numpy
default_rng(0), --seqs sequences of --seq-len ids). It prints:

1. the matmul FLOPs per token, counted from the checkpoint's config.json:
   q/k/v/o, gate/up/down, and attention's QK^T and PV over the causal
   (lower-triangular) part only, for sequences of --seq-len tokens;
2. the measured peak of the register-only vdpbf16ps (bf16) and fp32 FMA loops
   on --threads threads (benchmarks/kernels/matmul_bench.c, BENCH_ONLY=peak,
   built with make);
3. armorm: tokens/s (median of --reps after a warm-up), GFLOP/s, % of peak,
   and a `perf record` profile (cpu-clock, --perf-freq Hz) of one more pass in
   a process doing nothing else: time shares of the GEMM micro-kernel, the
   packers, the GEMM driver, attention, norms/rope/glu, the OpenMP runtime
   and the rest, and from them the micro-kernel's own GFLOP/s;
4. transformers (torch CPU, sdpa, one sequence per forward): tokens/s,
   GFLOP/s, % of peak and torch.profiler's self-CPU-time table of one more pass;
5. the tokens/s that a goal (--goal; by default armorm >= 4x transformers
   in bf16, >= 2x in fp32) requires, the GFLOP/s that implies and its % of the peak.

armorm and transformers each run in their own subprocess (armorm's under
perf), one after the other, so neither shares memory or threads with the other.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import cpu_prefill  # noqa: E402  (benchmarks/cpu_prefill.py: shapes and the cached checkpoints)

GOALS = {"bfloat16": 4.0, "float32": 2.0}  # issue 7: armorm tokens/s >= this x transformers tokens/s
PEAK_KIND = {"bfloat16": "vdpbf16ps", "float32": "fp32 FMA"}
UKR = {"bfloat16": "ukr_bf16", "float32": "ukr_f32"}
MIN_UTIL = 0.9  # process CPU time / (wall x threads) below this: the machine was busy with other work
MIN_HIDDEN_COSINE = 0.99  # armorm vs transformers final hidden state: below this they ran different models


# ---- 1. FLOPs ---------------------------------------------------------------------------------------------

def flops_per_token(cfg: dict, seq_len: int) -> Tuple[Dict[str, float], int]:
    """Matmul FLOPs per token and per layer (multiply + add = 2), and the layer count.

    Projections: 2 * in * out per token. Attention: token i (0-based) of a
    sequence attends to i + 1 keys (causal), 2 * head_dim FLOPs per key per
    head for QK^T and as much for PV; averaged over the sequence's tokens that
    is 2 * heads * head_dim * (L + 1) / 2 each.
    """
    h, nh, layers = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_hidden_layers"]
    nkv = cfg.get("num_key_value_heads") or nh
    hd = cfg.get("head_dim") or h // nh
    inter = cfg["intermediate_size"]
    attn = 2.0 * nh * hd * (seq_len + 1) / 2
    per_layer = {"q_proj": 2.0 * h * nh * hd, "k_proj": 2.0 * h * nkv * hd, "v_proj": 2.0 * h * nkv * hd,
                 "o_proj": 2.0 * nh * hd * h, "gate_proj": 2.0 * h * inter, "up_proj": 2.0 * h * inter,
                 "down_proj": 2.0 * inter * h, "attention QK^T (causal)": attn, "attention PV (causal)": attn}
    return per_layer, layers


# ---- 2. peak ----------------------------------------------------------------------------------------------

def measure_peak(threads: int) -> Dict[str, Dict[str, float]]:
    """Builds benchmarks/kernels' harness and runs its BENCH_ONLY=peak mode; GFLOP/s per kind."""
    kdir = HERE / "kernels"
    mk = subprocess.run(["nice", "make", "-s", "-C", str(kdir), "build/matmul_bench"], capture_output=True, text=True)
    if mk.returncode != 0:
        raise RuntimeError(f"building the kernel harness failed:\n{mk.stdout}{mk.stderr}")
    r = subprocess.run([str(kdir / "build" / "matmul_bench"), str(threads)], capture_output=True, text=True,
                       env={**os.environ, "BENCH_ONLY": "peak"})
    if r.returncode != 0:
        raise RuntimeError(f"matmul_bench peak mode failed (rc {r.returncode}):\n{r.stdout}{r.stderr}")
    out = {}
    for kind, label in (("vdpbf16ps", r"vdpbf16ps zmm"), ("fp32 FMA", r"fp32 FMA zmm")):
        m = re.search(r"peak " + label + r":\s+([\d.]+) GFLOP/s per core \(per CPU-second\), ([\d.]+) wall on (\d+) "
                      r"threads", r.stdout)
        if m is None:
            raise RuntimeError(f"no '{kind}' peak line in matmul_bench's output:\n{r.stdout}")
        if int(m.group(3)) != threads:
            raise RuntimeError(f"matmul_bench measured {m.group(3)} threads, asked for {threads}")
        per_core, wall = float(m.group(1)), float(m.group(2))
        out[kind] = {"per_core": per_core, "wall": wall, "peak": max(wall, per_core * threads)}
    return out


# ---- workers (subprocesses) -------------------------------------------------------------------------------

def make_tokens(vocab: int, n: int, length: int) -> List[np.ndarray]:
    """The token ids benchmarks/cpu_prefill.py scores (same generator, same seed)."""
    rng = np.random.default_rng(0)
    return [rng.integers(0, vocab, size=length).astype(np.int32) for _ in range(n)]


def timed(fn, reps: int) -> Tuple[List[float], List[float]]:
    """Wall and process-CPU seconds of `reps` calls of fn, after one warm-up call."""
    fn()
    walls, cpus = [], []
    for _ in range(reps):
        t, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return walls, cpus


def perf_ctl(cmd: str) -> None:
    """Sends 'enable' or 'disable' to the perf record this process runs under (if any) and waits for its ack."""
    ctl = os.environ.get("PREFILL_PROFILE_PERF_CTL")
    if not ctl:
        return
    ctl_path, ack_path = ctl.split(",")
    with open(ctl_path, "w") as f:
        f.write(cmd + "\n")
    with open(ack_path) as f:
        if f.readline().strip() != "ack":
            raise RuntimeError(f"perf did not acknowledge '{cmd}'")


def worker_armorm(args, seqs: List[np.ndarray]) -> dict:
    import armorm
    m = armorm.ArmoRM.from_pretrained(args.checkpoint, num_threads=args.threads)
    try:
        def run():
            m.score_sequences(seqs, fields=["hidden_state"])
        walls, cpus = timed(run, args.reps)
        h = np.asarray(m.score_sequences(seqs[:1], fields=["hidden_state"]).hidden_state, dtype=np.float64)[0]
        perf_ctl("enable")
        t, c = time.perf_counter(), time.process_time()
        run()
        pw, pc = time.perf_counter() - t, time.process_time() - c
        perf_ctl("disable")
        return dict(walls=walls, cpus=cpus, profiled_wall=pw, profiled_cpu=pc, hidden=h.tolist(),
                    module=armorm.__file__)
    finally:
        m.close()


def worker_transformers(args, seqs: List[np.ndarray]) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import LlamaModel
    torch.set_num_threads(args.threads)
    hf = LlamaModel.from_pretrained(args.checkpoint, dtype=getattr(torch, args.dtype), attn_implementation="sdpa")
    hf = hf.eval()
    ids = [torch.from_numpy(s.astype(np.int64))[None] for s in seqs]

    def run():
        with torch.no_grad():
            for x in ids:
                hf(x)
    walls, cpus = timed(run, args.reps)
    with torch.no_grad():
        h = hf(ids[0]).last_hidden_state[0, -1].to(torch.float64).numpy()
    t, c = time.perf_counter(), time.process_time()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    pw, pc = time.perf_counter() - t, time.process_time() - c
    ka = prof.key_averages()
    ops = [dict(name=e.key, self_us=e.self_cpu_time_total, total_us=e.cpu_time_total, calls=e.count) for e in ka]
    table = ka.table(sort_by="self_cpu_time_total", row_limit=args.table_rows)
    return dict(walls=walls, cpus=cpus, profiled_wall=pw, profiled_cpu=pc, hidden=h.tolist(), ops=ops, table=table,
                torch=torch.__version__, threads=torch.get_num_threads())


# ---- 3. perf ----------------------------------------------------------------------------------------------

CATEGORIES = ["GEMM micro-kernel", "GEMM packers", "GEMM driver/epilogue", "attention", "norms/rope/glu",
              "OpenMP runtime (waits, forks)", "kernel (OS)", "other"]


def categorize(dso: str, sym: str) -> str:
    """The part of the forward pass an armorm symbol belongs to (names from csrc/ and the libraries)."""
    if sym.startswith("ukr_"):
        return "GEMM micro-kernel"
    if sym.startswith("pack_"):
        return "GEMM packers"
    if sym.startswith(("gemm_run", "matmul", "gemm_kernel_", "epilogue", "mm_micro")):
        return "GEMM driver/epilogue"
    if sym.startswith("attention"):
        return "attention"
    if sym.startswith(("rmsnorm", "rope", "glu")):
        return "norms/rope/glu"
    if "libgomp" in dso:
        return "OpenMP runtime (waits, forks)"
    if "kernel" in dso or dso.startswith("[k"):
        return "kernel (OS)"
    return "other"


def perf_rows(data: Path) -> List[Tuple[int, int, str, str]]:
    """(cpu-clock period ns, samples, dso, symbol) per symbol of a perf.data."""
    r = subprocess.run(["perf", "report", "-i", str(data), "-q", "--stdio", "--no-children", "--sort", "dso,sym",
                        "-F", "overhead,period,sample,dso,sym"], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"perf report failed: {r.stderr.strip()}")
    rows = []
    for line in r.stdout.splitlines():
        m = re.match(r"\s*[\d.]+%\s+(\d+)\s+(\d+)\s+(\S+)\s+\[.\]\s+(.*\S)", line)
        if m:
            rows.append((int(m.group(1)), int(m.group(2)), m.group(3), m.group(4)))
    if not rows:
        raise RuntimeError(f"perf report gave no samples:\n{r.stdout[:2000]}{r.stderr[:2000]}")
    return rows


def run_worker(name: str, args, tmp: Path, use_perf: bool) -> Tuple[dict, Optional[List], Optional[str]]:
    """Runs a worker subprocess (armorm's under perf record when asked); its result, perf rows, why no perf."""
    result = tmp / f"{name}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--result", str(result),
           "--checkpoint", str(args.checkpoint), "--dtype", args.dtype, "--threads", str(args.threads),
           "--reps", str(args.reps), "--seqs", str(args.seqs), "--seq-len", str(args.seq_len),
           "--vocab", str(args.vocab), "--table-rows", str(args.table_rows)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    why = None
    if use_perf:
        perf = shutil.which("perf")
        if perf is None:
            why = "perf not found on PATH"
        else:
            ctl, ack, data = tmp / "perf.ctl", tmp / "perf.ack", tmp / "perf.data"
            os.mkfifo(ctl)
            os.mkfifo(ack)
            pcmd = [perf, "record", "-N", "-q", "-e", "cpu-clock", "-F", str(args.perf_freq), "-D", "-1",
                    "--control", f"fifo:{ctl},{ack}", "-o", str(data), "--"] + cmd
            r = subprocess.run(pcmd, env={**env, "PREFILL_PROFILE_PERF_CTL": f"{ctl},{ack}"},
                               capture_output=True, text=True)
            if r.returncode == 0 and result.exists():
                return json.loads(result.read_text()), perf_rows(data), None
            if result.exists():  # the work ran but perf failed: the result is good, the profile is not
                raise RuntimeError(f"perf record failed (rc {r.returncode}):\n{r.stderr[-3000:]}")
            why = f"perf record failed to run the worker (rc {r.returncode}): {r.stderr.strip()[-500:]}"
            print(f"perf unavailable, running without it: {why}", flush=True)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0 or not result.exists():
        raise RuntimeError(f"{name} worker failed (rc {r.returncode}):\n{r.stdout[-3000:]}{r.stderr[-3000:]}")
    return json.loads(result.read_text()), None, why


# ---- report -----------------------------------------------------------------------------------------------

def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(cpu_prefill.SHAPES), default="1b")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    ap.add_argument("--seqs", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=1, help="timed passes after the warm-up (median reported)")
    ap.add_argument("--perf-freq", type=int, default=1000, help="perf record sampling frequency, Hz")
    ap.add_argument("--no-perf", action="store_true", help="skip the perf profile of armorm")
    ap.add_argument("--goal", type=float, default=None,
                    help="the armorm / transformers ratio to test in 5. (default: 4 in bf16, 2 in fp32; "
                         "3 is the serve benchmark's goal against the transformers server)")
    ap.add_argument("--table-rows", type=int, default=15, help="rows of torch.profiler's table")
    ap.add_argument("--cache-dir", type=Path,
                    default=Path(os.environ.get("ARMORM_BENCH_CACHE", Path.home() / ".cache" / "armorm-bench")),
                    help="where benchmarks/cpu_prefill.py keeps its generated checkpoints")
    # internal: the subprocesses
    ap.add_argument("--worker", choices=("armorm", "transformers"), help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if min(args.reps, args.seqs, args.seq_len, args.threads, args.perf_freq, args.table_rows) < 1:
        ap.error("--reps, --seqs, --seq-len, --threads, --perf-freq and --table-rows must be >= 1")

    if args.worker:
        seqs = make_tokens(args.vocab, args.seqs, args.seq_len)
        res = (worker_armorm if args.worker == "armorm" else worker_transformers)(args, seqs)
        args.result.write_text(json.dumps(res))
        return 0

    load0 = os.getloadavg()
    shape = cpu_prefill.SHAPES[args.shape]
    root = args.cache_dir / args.shape
    root.mkdir(parents=True, exist_ok=True)
    args.checkpoint = cpu_prefill.make_checkpoint(root, shape, args.dtype)
    args.vocab = shape["vocab"]
    cfg = json.loads((args.checkpoint / "config.json").read_text())
    ntok = args.seqs * args.seq_len

    per_layer, layers = flops_per_token(cfg, args.seq_len)
    proj = sum(v for k, v in per_layer.items() if not k.startswith("attention"))
    attn = sum(v for k, v in per_layer.items() if k.startswith("attention"))
    fpt = layers * (proj + attn)  # FLOPs per token
    gf_tok = fpt / 1e9

    peaks = measure_peak(args.threads)
    pk = peaks[PEAK_KIND[args.dtype]]
    peak = pk["peak"]

    with tempfile.TemporaryDirectory(prefix="prefill_profile.") as td:
        tmp = Path(td)
        ours, rows, no_perf_why = run_worker("armorm", args, tmp, use_perf=not args.no_perf)
        if args.no_perf:
            no_perf_why = "--no-perf"
        hf, _, _ = run_worker("transformers", args, tmp, use_perf=False)
    load1 = os.getloadavg()

    h_ours, h_hf = np.asarray(ours["hidden"]), np.asarray(hf["hidden"])
    cos = cosine(h_ours, h_hf)
    rel = float(np.linalg.norm(h_ours - h_hf) / np.linalg.norm(h_hf))
    if cos < MIN_HIDDEN_COSINE:
        raise RuntimeError(f"armorm and transformers disagree on sequence 0's final hidden state (cosine {cos:.4f} "
                           f"< {MIN_HIDDEN_COSINE}): they did not run the same model")

    def rate(w: dict) -> Tuple[float, float, float]:
        wall, cpu = statistics.median(w["walls"]), statistics.median(w["cpus"])
        return ntok / wall, cpu / (wall * args.threads), wall
    tps_o, util_o, wall_o = rate(ours)
    tps_h, util_h, wall_h = rate(hf)
    gfs_o, gfs_h = tps_o * gf_tok, tps_h * gf_tok

    p = print

    def contended(util: float) -> None:
        if util < MIN_UTIL:
            p(f"   WARNING: the process had {100 * util:.0f}% of {args.threads} threads' CPU time: other work was "
              f"running, so this wall-clock figure understates the speed (compare load averages; rerun when idle)")
    p(f"\n=== prefill profile: shape {args.shape}, {args.dtype}, {args.seqs} x {args.seq_len} tokens, "
      f"{args.threads} threads ===")
    p(f"checkpoint {args.checkpoint}")
    p(f"load average at start {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}, at end {load1[0]:.2f} {load1[1]:.2f} "
      f"{load1[2]:.2f}")

    p(f"\n1. matmul FLOPs per token (config: hidden {cfg['hidden_size']}, {layers} layers, "
      f"{cfg['num_attention_heads']} heads / {cfg.get('num_key_value_heads')} kv heads, head_dim "
      f"{cfg.get('head_dim') or cfg['hidden_size'] // cfg['num_attention_heads']}, intermediate "
      f"{cfg['intermediate_size']}; sequence length {args.seq_len})")
    p(f"   {'term':<26} {'MFLOP/layer':>12} {'MFLOP/token':>12}")
    for k, v in per_layer.items():
        p(f"   {k:<26} {v / 1e6:>12.3f} {v * layers / 1e6:>12.2f}")
    p(f"   {'projections (7 GEMMs)':<26} {proj / 1e6:>12.3f} {proj * layers / 1e6:>12.2f}")
    p(f"   {'attention (causal half)':<26} {attn / 1e6:>12.3f} {attn * layers / 1e6:>12.2f}")
    p(f"   {'total':<26} {(proj + attn) / 1e6:>12.3f} {fpt / 1e6:>12.2f}   = {gf_tok:.4f} GFLOP/token")
    p("   counted: 2 FLOPs per multiply-add; attention over the causal part only (token i sees i+1 keys). Not "
      "counted: embedding gather, RMSNorm, RoPE, softmax, SiLU, residual adds (O(hidden) per token, < 0.1%), "
      "and no LM head (reward scoring reads the final hidden state; the reward heads run on one row per sequence)")

    p(f"\n2. measured peak, {args.threads} threads (benchmarks/kernels/matmul_bench BENCH_ONLY=peak, "
      f"register-only loops)")
    for kind, v in peaks.items():
        p(f"   {kind:<10} {v['per_core']:7.1f} GFLOP/s per core (per CPU-second), {v['wall']:7.1f} wall on "
          f"{args.threads} threads -> peak {v['peak']:.1f} GFLOP/s")
    p(f"   peak used for {args.dtype}: {PEAK_KIND[args.dtype]} {peak:.1f} GFLOP/s (the larger of the wall-clock rate "
      f"and per-core x {args.threads}, so a busy machine cannot understate it)")

    p(f"\n3. armorm ({ours['module']}): {tps_o:.1f} tokens/s (median of {args.reps}, wall {wall_o:.2f} s, CPU "
      f"{100 * util_o:.0f}% of {args.threads} threads) = {gfs_o:.1f} GFLOP/s = {100 * gfs_o / peak:.1f}% of peak")
    contended(util_o)
    if rows is None:
        p(f"   perf breakdown skipped: {no_perf_why}")
    else:
        total = sum(r[0] for r in rows)
        nsamp = sum(r[1] for r in rows)
        by_cat: Dict[str, int] = {c: 0 for c in CATEGORIES}
        by_sym: Dict[Tuple[str, str], int] = {}
        for period, _, dso, sym in rows:
            by_cat[categorize(dso, sym)] += period
            by_sym[(dso, sym)] = by_sym.get((dso, sym), 0) + period
        cpu_s = total / 1e9
        pw = ours["profiled_wall"]
        p(f"   perf record -e cpu-clock -F {args.perf_freq} of one more pass: {nsamp} samples, {cpu_s:.2f} CPU-s "
          f"in {pw:.2f} s wall (CPU {100 * cpu_s / (pw * args.threads):.0f}% of {args.threads} threads; "
          f"{ntok / pw:.1f} tokens/s under perf)")
        p(f"   {'part':<32} {'% of CPU':>9} {'CPU-s':>7}")
        for c in CATEGORIES:
            p(f"   {c:<32} {100 * by_cat[c] / total:>8.1f}% {by_cat[c] / 1e9:>7.2f}")
        p("   top symbols:")
        for (dso, sym), v in sorted(by_sym.items(), key=lambda kv: -kv[1])[:10]:
            p(f"     {100 * v / total:5.1f}%  {sym}  ({Path(dso).name})")
        ukr_s = by_cat["GEMM micro-kernel"] / 1e9
        gemm_s = sum(by_cat[c] for c in ("GEMM micro-kernel", "GEMM packers", "GEMM driver/epilogue")) / 1e9
        att_s = by_cat["attention"] / 1e9
        proj_gf = ntok * layers * proj / 1e9
        attn_gf = ntok * layers * attn / 1e9
        if ukr_s > 0:
            r = proj_gf / ukr_s
            p(f"   {UKR[args.dtype]}: {proj_gf:.0f} GFLOP of projections in {ukr_s:.2f} CPU-s = {r:.1f} GFLOP/s per "
              f"core = {100 * r / pk['per_core']:.0f}% of the per-core {PEAK_KIND[args.dtype]} peak "
              f"({pk['per_core']:.1f}); x {args.threads} threads = {r * args.threads:.1f} GFLOP/s")
            p(f"   whole GEMM (micro-kernel + packers + driver): {proj_gf / gemm_s:.1f} GFLOP/s per core = "
              f"{100 * proj_gf / gemm_s / pk['per_core']:.0f}% of per-core peak")
        else:
            p(f"   no samples in {UKR[args.dtype]}: the micro-kernel's rate cannot be computed")
        if att_s > 0:
            p(f"   attention: {attn_gf:.1f} GFLOP in {att_s:.2f} CPU-s = {attn_gf / att_s:.1f} GFLOP/s per core "
              f"(fp32 FMA)")

    p(f"\n4. transformers (torch {hf['torch']} CPU, sdpa, one sequence per forward, {hf['threads']} threads): "
      f"{tps_h:.1f} tokens/s (median of {args.reps}, wall {wall_h:.2f} s, CPU {100 * util_h:.0f}% of "
      f"{args.threads} threads) = {gfs_h:.1f} GFLOP/s = {100 * gfs_h / peak:.1f}% of peak")
    contended(util_h)
    ops = hf["ops"]
    tot_self = sum(o["self_us"] for o in ops)
    gemm_ops = ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul")
    gemm_us = sum(o["self_us"] for o in ops if o["name"] in gemm_ops)
    mm_us = sum(o["self_us"] for o in ops if o["name"] in ("aten::mm", "aten::addmm", "aten::bmm"))
    sdpa_us = sum(o["self_us"] for o in ops if "scaled_dot_product" in o["name"])
    p(f"   torch.profiler of one more pass ({hf['profiled_wall']:.2f} s wall, CPU "
      f"{100 * hf['profiled_cpu'] / (hf['profiled_wall'] * args.threads):.0f}% of {args.threads} threads; "
      f"{ntok / hf['profiled_wall']:.1f} tokens/s under the profiler); self CPU time is the wall time of each op on "
      f"the calling thread, its intra-op worker threads running inside it:")
    p("   " + hf["table"].replace("\n", "\n   "))
    if mm_us > 0:
        p(f"   matmul ops (aten::mm/addmm/bmm) {100 * mm_us / tot_self:.1f}% of self time, with linear/matmul "
          f"wrappers {100 * gemm_us / tot_self:.1f}%; sdpa {100 * sdpa_us / tot_self:.1f}%; the rest "
          f"{100 * (tot_self - gemm_us - sdpa_us) / tot_self:.1f}%")
        p(f"   torch's GEMMs: {ntok * layers * proj / 1e9:.0f} GFLOP in {mm_us / 1e6:.2f} s = "
          f"{ntok * layers * proj / 1e3 / mm_us:.1f} GFLOP/s on {args.threads} threads = "
          f"{100 * ntok * layers * proj / 1e3 / mm_us / peak:.0f}% of peak")
    p(f"   check: sequence 0's final hidden state, armorm vs transformers: cosine {cos:.6f}, rel err {rel:.2e}")

    goal = args.goal if args.goal is not None else GOALS[args.dtype]
    need_tps = goal * tps_h
    need_gfs = need_tps * gf_tok
    p(f"\n5. conclusion ({args.dtype}): armorm / transformers = {tps_o / tps_h:.2f}x (goal {goal:g}x)")
    p(f"   {goal:g}x transformers = {need_tps:.1f} tokens/s x {gf_tok:.4f} GFLOP/token = {need_gfs:.1f} GFLOP/s "
      f"= {100 * need_gfs / peak:.0f}% of the measured {PEAK_KIND[args.dtype]} peak ({peak:.1f} GFLOP/s)")
    p(f"   at 100% of peak (no attention, norms or packing time at all) armorm would reach "
      f"{peak / gf_tok:.1f} tokens/s = {peak / gf_tok / tps_h:.2f}x transformers")
    verdict = (f"NOT reachable: it needs {100 * need_gfs / peak:.0f}% of the peak" if need_gfs > peak else
               f"below the peak ({100 * need_gfs / peak:.0f}% of it)")
    now = (f"met: armorm is {tps_o / tps_h:.2f}x" if tps_o >= need_tps else
           f"armorm is {tps_o / tps_h:.2f}x, {need_tps / tps_o:.2f}x short ({need_tps - tps_o:.1f} tokens/s)")
    p(f"   goal {goal:g}x: {verdict}; {now}")
    if args.dtype == "float32" and need_gfs > peak:
        bf = peaks["vdpbf16ps"]["peak"]
        p(f"   (the {need_gfs:.1f} GFLOP/s is {100 * need_gfs / bf:.0f}% of the vdpbf16ps peak, {bf:.1f}: reachable "
          f"only by rounding the fp32 operands to bf16, which is no longer fp32 arithmetic)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
