"""Stage-1 ridge regression: armorm's train-stage1 against the reference procedure.

Synthetic data with the structure of ArmoRM-Multi-Objective-Data-v0.1: 19
objectives from 7 sources, each source labelling only its own block
(HelpSteer 5, UltraFeedback 5, BeaverTails 1, Prometheus 1, two Argilla sets
1 each, code 5), uneven source sizes; embeddings stored as bf16 in 4 shard
files, labels float32 with NaN for missing.

- armorm: `armorm.train.stage1.train(files)` (one X^T X accumulation per label
  mask, all alphas from it: float32 Cholesky factors shared between alphas
  where that converges fast, refined in float64; with bf16 embeddings X^T X
  on the core's AVX512_BF16 GEMM, the solutions then refined against the
  exact rows). `--gram float64` also times the exact float64 accumulation.
- reference: what RLHFlow's stage-1_train.py does -- load everything as
  float32, `train_test_split(test_size=0.2, random_state=42)`, then for each
  objective and alpha `Ridge(alpha, fit_intercept=False).fit` on its labelled
  training rows, validation MSE, and a final refit with the best alpha
  (scikit-learn; float32 as the reference runs it). `--reference-fp64` also
  runs it on float64 copies (the precise answer armorm is tested against).

Each procedure runs in a fresh subprocess (wall time and peak RSS of that
process, loading the files included); the table gives medians over
`--repeats` runs and the speed ratio. `--big` runs only armorm at the real
dataset's scale (500,000 x 4096 bf16, about 4 GB of files): wall time and
peak memory.

    python benchmarks/stage1_ridge.py                      # 60,000 x 2048, as the issue asks
    python benchmarks/stage1_ridge.py --gram auto --gram float64 --reference-fp64
    python benchmarks/stage1_ridge.py --rows 20000 --dim 1024 --repeats 3
    python benchmarks/stage1_ridge.py --big --gram auto --gram float64 --dir /tmp/big --keep
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from armorm.config import ATTRIBUTES  # noqa: E402
from armorm.safetensors_io import SafetensorsFile, bf16_to_float32, float32_to_bf16, save_file  # noqa: E402

ALPHAS = [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4]
# (source, objective indices, share of the rows): uneven, UltraFeedback largest, as in the real data
SOURCES = [("helpsteer", [0, 1, 2, 3, 4], 0.07), ("ultrafeedback", [5, 6, 7, 8, 9], 0.40),
           ("beavertails", [10], 0.06), ("prometheus", [11], 0.18), ("argilla-overall", [12], 0.06),
           ("argilla-judge", [13], 0.14), ("code", [14, 15, 16, 17, 18], 0.09)]


def make_data(d: str, rows: int, dim: int, files: int = 4, seed: int = 0, chunk: int = 8192) -> list:
    """Writes `files` shard files of bf16 embeddings + float32 labels; returns their paths."""
    rng = np.random.default_rng(seed)
    K = len(ATTRIBUTES)
    spectrum = (1.0 / np.sqrt(1.0 + np.arange(dim) / 16.0)).astype(np.float32)  # decaying, like real embeddings
    W = (rng.normal(size=(K, dim)) * spectrum).astype(np.float32) * 0.5
    shares = np.array([s[2] for s in SOURCES])
    source_of_row = rng.choice(len(SOURCES), size=rows, p=shares / shares.sum())
    noise = rng.uniform(0.05, 0.6, size=K).astype(np.float32)
    cuts = np.linspace(0, rows, files + 1).astype(int)
    paths = []
    for fi in range(files):
        a, b = cuts[fi], cuts[fi + 1]

        def emb_parts(a=a, b=b):
            for s in range(a, b, chunk):
                e = min(b, s + chunk)
                r = np.random.default_rng([seed, s])
                yield float32_to_bf16(r.standard_normal((e - s, dim), dtype=np.float32) * spectrum)

        def lab_parts(a=a, b=b):
            for s in range(a, b, chunk):
                e = min(b, s + chunk)
                r = np.random.default_rng([seed, s])
                X = r.standard_normal((e - s, dim), dtype=np.float32) * spectrum
                X = bf16_to_float32(float32_to_bf16(X))  # the stored values
                Y = np.full((e - s, K), np.nan, dtype=np.float32)
                src = source_of_row[s:e]
                for si, (_, ks, _) in enumerate(SOURCES):
                    m = src == si
                    if m.any():
                        Y[np.ix_(m, ks)] = X[m] @ W[ks].T + r.normal(size=(m.sum(), len(ks))) * noise[ks]
                yield Y

        p = os.path.join(d, f"synthetic-{fi + 1:05d}-of-{files:05d}.safetensors")
        save_file({"embeddings": ("BF16", (b - a, dim), emb_parts()), "labels": ("F32", (b - a, K), lab_parts())},
                  p, metadata={"objectives": json.dumps(ATTRIBUTES)})
        paths.append(p)
    return paths


ARMORM_CHILD = """
import json, sys, time
sys.path.insert(0, {root!r})
t = time.perf_counter()
from armorm.train import stage1
r = stage1.train({files!r}, solver={solver!r}, gram={gram!r})
wall = time.perf_counter() - t
import resource
json.dump({{"wall": wall, "alphas": [e.get("alpha") for e in r.report["objectives"]],
           "timings": r.report["timings_s"], "solver": r.report["solver"], "work": r.report.get("solver_work"),
           "grams": sorted({{g["gram"] for g in r.report["groups"]}}),
           "passes": max([g.get("exact_passes", 0) for g in r.report["groups"]]),
           "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}}, open({out!r}, "w"))
import numpy as np; np.save({wout!r}, r.weight)
"""

REFERENCE_CHILD = """
import json, sys, time
import numpy as np
sys.path.insert(0, {root!r})
t = time.perf_counter()
from armorm.safetensors_io import load_file
from sklearn.linear_model import Ridge
from sklearn.metrics import mean_squared_error
from sklearn.model_selection import train_test_split
parts = [load_file(f, as_float32=True) for f in sorted({files!r})]
X = np.concatenate([p["embeddings"] for p in parts]).astype({dtype!r})
Y = np.concatenate([p["labels"] for p in parts]).astype({dtype!r})
del parts
X_train, X_val, y_train, y_val = train_test_split(X, Y, test_size=0.2, random_state=42)
alphas = {alphas!r}
best, weights = [], []
for k in range(Y.shape[1]):
    m, mv = ~np.isnan(y_train[:, k]), ~np.isnan(y_val[:, k])
    Xk, yk, Xv, yv = X_train[m], y_train[m, k], X_val[mv], y_val[mv, k]
    losses = []
    for a in alphas:
        clf = Ridge(alpha=a, fit_intercept=False).fit(Xk, yk)
        losses.append(mean_squared_error(yv, clf.predict(Xv)))
    a = alphas[int(np.argmin(losses))]
    best.append(a)
    weights.append(Ridge(alpha=a, fit_intercept=False).fit(Xk, yk).coef_)
wall = time.perf_counter() - t
import resource
json.dump({{"wall": wall, "alphas": best,
           "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}}, open({out!r}, "w"))
np.save({wout!r}, np.stack(weights).astype(np.float64))
"""


CHILD_ENV = dict(os.environ)


def run_child(template: str, **fmt) -> dict:
    """Runs the filled-in `template` in a fresh interpreter; returns its JSON result and weights."""
    with tempfile.TemporaryDirectory() as td:
        out, wout = os.path.join(td, "r.json"), os.path.join(td, "w.npy")
        script = template.format(out=out, wout=wout, root=ROOT, **fmt)
        p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=CHILD_ENV)
        if p.returncode:
            raise RuntimeError(f"child failed:\n{p.stderr[-3000:]}")
        with open(out) as f:
            res = json.load(f)
        res["weight"] = np.load(wout)
        return res


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    num = np.abs(a - b).max(axis=1)
    den = np.maximum(np.abs(b).max(axis=1), 1e-30)
    return float((num / den).max())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=60000)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3, help="runs of armorm (median); the reference runs "
                    "--reference-repeats times")
    ap.add_argument("--reference-repeats", type=int, default=1, help="runs of the float32 reference (median)")
    ap.add_argument("--reference-fp64", action="store_true", help="also run the reference on float64 copies")
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--solver", default="auto", choices=["auto", "mixed", "cholesky", "eigh", "lu"])
    ap.add_argument("--gram", action="append", choices=["auto", "bf16", "float64"],
                    help="armorm's X^T X accumulation; repeat to time several (default: auto)")
    ap.add_argument("--big", action="store_true", help="500,000 x 4096, armorm only (wall time, peak memory)")
    ap.add_argument("--blas-threads", type=int, help="set OPENBLAS/OMP/MKL_NUM_THREADS for both procedures "
                    "(default: the BLAS library's own choice)")
    ap.add_argument("--dir", help="where to write the synthetic files (default: a temporary directory)")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic files")
    ap.add_argument("--reuse-data", action="store_true", help="use the files already in --dir (from an earlier "
                    "run with the same --rows/--dim) instead of generating them")
    args = ap.parse_args()
    if args.blas_threads:
        for v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            CHILD_ENV[v] = str(args.blas_threads)
    if args.big:
        args.rows, args.dim, args.no_reference = 500_000, 4096, True
        args.repeats = min(args.repeats, 1)
    d = args.dir or tempfile.mkdtemp(prefix="stage1-bench-")
    os.makedirs(d, exist_ok=True)
    try:
        t = time.perf_counter()
        files = sorted(glob.glob(os.path.join(d, "synthetic-*.safetensors"))) if args.reuse_data else []
        if files:
            shape = [SafetensorsFile(f).info("embeddings").shape for f in files]
            if sum(s[0] for s in shape) != args.rows or any(s[1] != args.dim for s in shape):
                raise SystemExit(f"{d} holds {sum(s[0] for s in shape)} x {shape[0][1]} rows, not "
                                 f"{args.rows} x {args.dim}: drop --reuse-data")
        else:
            files = make_data(d, args.rows, args.dim)
        size = sum(os.path.getsize(f) for f in files) / 2 ** 30
        print(f"data: {args.rows:,} x {args.dim} bf16 in {len(files)} files ({size:.2f} GiB), 19 objectives "
              f"from 7 sources; generated in {time.perf_counter() - t:.0f} s", flush=True)
        try:
            import sklearn
            skv = sklearn.__version__
        except ImportError:
            skv = "not installed"
        print(f"machine: {os.cpu_count()} CPUs; numpy {np.__version__}, scikit-learn {skv}; "
              f"BLAS threads: {args.blas_threads or 'default'}", flush=True)

        variants = {}
        for rep in range(args.repeats):  # the variants alternate, so a change of machine load hits them alike
            for gram in args.gram or ["auto"]:
                r = run_child(ARMORM_CHILD, files=files, solver=args.solver, gram=gram)
                variants.setdefault(gram, []).append(r)
                t = r["timings"]
                print(f"  armorm (gram={gram}) run: {r['wall']:.2f} s (accumulate {t['accumulate']:.2f} s, "
                      f"solve {t['solve']:.2f} s, refine {t['refine']:.2f} s, validate {t['validate']:.2f} s; "
                      f"X^T X {'/'.join(r['grams'])}, exact passes {r['passes']}, {r['work']}), "
                      f"peak {r['peak_gib']:.2f} GiB", flush=True)
        rows = [(f"armorm train-stage1 (gram={gram})", statistics.median(r["wall"] for r in rs),
                 max(r["peak_gib"] for r in rs), rs[0]) for gram, rs in variants.items()]
        ours = [rows[0][3]]
        refs = []
        if not args.no_reference:
            variants = [("float32", "reference (sklearn, float32)")]
            if args.reference_fp64:
                variants.append(("float64", "reference (sklearn, float64)"))
            for dtype, label in variants:
                n_runs = args.reference_repeats if dtype == "float32" else 1  # the float64 variant: once
                runs = [run_child(REFERENCE_CHILD, files=files, dtype=dtype, alphas=ALPHAS) for _ in range(n_runs)]
                for r in runs:
                    print(f"  {label} run: {r['wall']:.2f} s, peak {r['peak_gib']:.2f} GiB", flush=True)
                runs[0]["all_walls"] = [r["wall"] for r in runs]
                refs.append((label, statistics.median(r["wall"] for r in runs),
                             max(r["peak_gib"] for r in runs), runs[0]))
        ours_t = rows[0][1]
        print()
        print("| procedure | median wall s | runs | peak RSS GiB | speed-up of armorm | same alphas | "
              "max rel weight diff vs armorm |")
        print("|---|---:|---:|---:|---:|---|---:|")
        for label, t, peak, r in rows + refs:
            if r is ours[0]:
                same = diff_w = "-"
            else:
                diff = [i for i, (x, y) in enumerate(zip(r["alphas"], ours[0]["alphas"])) if x != y]
                same = "yes" if not diff else "no: " + ", ".join(ATTRIBUTES[i] for i in diff)
                diff_w = f"{rel_err(ours[0]['weight'], r['weight']):.2e}"
            runs = len(r["all_walls"]) if "all_walls" in r else args.repeats
            print(f"| {label} | {t:.2f} | {runs} | {peak:.2f} | {t / ours_t:.1f}x | {same} | {diff_w} |")
        print(f"\narmorm chosen alphas: {ours[0]['alphas']}")
        for label, _, _, r in refs:
            print(f"{label} chosen alphas: {r['alphas']}")
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
