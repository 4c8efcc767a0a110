"""Stage 1: embeddings (prepare) and multi-objective ridge regression (train).

The ridge solver is checked against scikit-learn's Ridge(fit_intercept=False)
run the reference's way (split, per-objective NaN filtering, alpha grid, best
validation MSE, refit) on float64 copies of the same values; the split against
scikit-learn's train_test_split. prepare runs end to end on a tiny random
backbone with the real Llama-3 tokenizer.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import armorm
from armorm import cli
from armorm.data import DatasetError, open_dataset
from armorm.safetensors_io import (SafetensorsFile, bf16_to_float32, float32_to_bf16, load_file, save_file)
from armorm.train import stage1
from armorm.train import ridge
from armorm.train.prepare import shard_rows
from armorm.train.stage1 import DEFAULT_ALPHAS, train_test_split_indices
from checkpoints import make_armorm, make_backbone
from training_data import OBJ, make_records, write_jsonl

# ----------------------------------------------------------------------------- split, shards


def test_split_matches_sklearn_train_test_split():
    import sklearn.model_selection as sk  # a test dependency: an error, not a skip, when missing
    for n in list(range(2, 60)) + [97, 100, 101, 1000, 4321, 12345]:
        tr, te = train_test_split_indices(n, 0.2, 42)
        sk_tr, sk_te = sk.train_test_split(np.arange(n), test_size=0.2, random_state=42)
        assert np.array_equal(tr, sk_tr) and np.array_equal(te, sk_te), n
    for frac, seed in ((0.1, 0), (0.33, 7), (0.5, 123)):
        tr, te = train_test_split_indices(257, frac, seed)
        sk_tr, sk_te = sk.train_test_split(np.arange(257), test_size=frac, random_state=seed)
        assert np.array_equal(tr, sk_tr) and np.array_equal(te, sk_te)


def test_split_rejects_bad_fractions():
    for bad in (0.0, 1.0, -0.1, 2):
        with pytest.raises(ValueError, match="validation fraction"):
            train_test_split_indices(10, bad, 42)
    with pytest.raises(ValueError, match="cannot split 1 rows"):
        train_test_split_indices(1, 0.2, 42)


def test_shard_rows_follow_datasets_shuffle_and_shard():
    n = 103
    perm = np.random.default_rng(0).permutation(n)  # what datasets' shuffle(seed=0) uses
    assert np.array_equal(shard_rows(n), perm)
    for mode in ("contiguous", "strided"):
        parts = [shard_rows(n, n_shards=4, shard_idx=i, shard_mode=mode) for i in range(1, 5)]
        assert sorted(np.concatenate(parts).tolist()) == list(range(n))
        assert [len(p) for p in parts] == [26, 26, 26, 25]
    assert np.array_equal(np.concatenate([shard_rows(n, n_shards=4, shard_idx=i) for i in range(1, 5)]), perm)
    assert np.array_equal(shard_rows(n, n_shards=4, shard_idx=2, shard_mode="strided"), perm[1::4])
    for bad in (0, 5):
        with pytest.raises(ValueError, match="1-based"):
            shard_rows(n, n_shards=4, shard_idx=bad)


def test_shard_rows_equal_datasets_library():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"i": list(range(57))}).shuffle(seed=0)
    for i in range(1, 4):
        for mode, contiguous in (("contiguous", True), ("strided", False)):
            want = ds.shard(num_shards=3, index=i - 1, contiguous=contiguous)["i"]
            assert shard_rows(57, n_shards=3, shard_idx=i, shard_mode=mode).tolist() == want


# ----------------------------------------------------------------------------- ridge vs scikit-learn


def synthetic(scale=1.0, H=48, seed=0, dtype="F32"):
    """Sources labelling blocks of objectives, uneven sizes, one source smaller than H (dual form)."""
    rng = np.random.default_rng(seed)
    sources = [(0, [0, 1], int(1200 * scale)), (1, [2], int(900 * scale)), (2, [3, 4], int(45 * scale)),
               (3, [1], int(30 * scale))]
    n = sum(s[2] for s in sources)
    K = 5
    X = rng.normal(size=(n, H)) * rng.uniform(0.2, 3.0, size=H)
    X[:, :4] += X[:, 4:8] * 0.999  # ill-conditioned directions, so small alphas matter
    W = rng.normal(size=(K, H)) * rng.uniform(0, 1, size=(K, 1))
    noise = np.array([0.2, 5.0, 40.0, 1.0, 15.0])
    Y = np.full((n, K), np.nan)
    src = np.repeat([s[0] for s in sources], [s[2] for s in sources])
    rng.shuffle(src)
    for s, ks, _ in sources:
        rows = src == s
        for k in ks:
            Y[rows, k] = X[rows] @ W[k] + rng.normal(size=rows.sum()) * noise[k]
    if dtype == "BF16":
        X = bf16_to_float32(float32_to_bf16(X.astype(np.float32)))
    return X.astype(np.float32), Y.astype(np.float32)


def write_parts(d: Path, X, Y, parts=3, dtypes=None, names=None):
    d.mkdir(parents=True, exist_ok=True)
    cuts = np.linspace(0, len(X), parts + 1).astype(int)
    meta = {"objectives": json.dumps(names)} if names else None
    for i in range(parts):
        save_file({"embeddings": X[cuts[i]:cuts[i + 1]], "labels": Y[cuts[i]:cuts[i + 1]]},
                  d / f"data-{i + 1:05d}-of-{parts:05d}.safetensors", metadata=meta, dtypes=dtypes)
    return str(d / "*.safetensors")


def sklearn_reference(X, Y, alphas=DEFAULT_ALPHAS):
    """The reference procedure (stage-1_train.py), on float64 copies."""
    from sklearn.linear_model import Ridge  # a test dependency: an error, not a skip, when missing
    from sklearn.metrics import mean_squared_error
    from sklearn.model_selection import train_test_split
    Xtr, Xv, Ytr, Yv = train_test_split(X.astype(np.float64), Y.astype(np.float64), test_size=0.2, random_state=42)
    out = []
    for k in range(Y.shape[1]):
        m, mv = ~np.isnan(Ytr[:, k]), ~np.isnan(Yv[:, k])
        losses = [mean_squared_error(Yv[mv, k], Ridge(alpha=a, fit_intercept=False).fit(Xtr[m], Ytr[m, k])
                                     .predict(Xv[mv])) for a in alphas]
        best = int(np.argmin(losses))
        coef = Ridge(alpha=alphas[best], fit_intercept=False).fit(Xtr[m], Ytr[m, k]).coef_
        out.append({"alpha": alphas[best], "losses": losses, "coef": coef, "n_train": int(m.sum()),
                    "n_val": int(mv.sum())})
    return out


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    X, Y = synthetic(dtype="BF16")
    d = tmp_path_factory.mktemp("synth")
    return X, Y, write_parts(d, X, Y, dtypes={"embeddings": "BF16"}), sklearn_reference(X, Y)


@pytest.mark.parametrize("solver,form,gram", [("auto", "auto", "auto"), ("cholesky", "primal", "float64"),
                                              ("mixed", "primal", "float64"), ("mixed", "auto", "bf16"),
                                              ("eigh", "auto", "auto"), ("lu", "dual", "auto"),
                                              ("eigh", "dual", "auto")])
def test_ridge_matches_sklearn(synth, solver, form, gram, tmp_path):
    X, Y, glob, ref = synth
    if gram == "bf16" and ridge.bf16_gemm_kernel() is None:  # this CPU has no AVX512_BF16
        with pytest.raises(ValueError, match="gram='bf16' is not available: this CPU has no AVX512_BF16"):
            stage1.train(glob, solver=solver, form=form, gram=gram)
        return
    res = stage1.train(glob, tmp_path / "w.safetensors", solver=solver, form=form, gram=gram)
    chosen = [r["alpha"] for r in ref]
    assert len(set(chosen)) > 1, "the synthetic data should not choose one alpha for everything"
    for k, r in enumerate(ref):
        e = res.report["objectives"][k]
        assert e["alpha"] == r["alpha"], (k, e["val_mse_by_alpha"], r["losses"])
        assert (e["train_count"], e["val_count"]) == (r["n_train"], r["n_val"])
        np.testing.assert_allclose(e["val_mse_by_alpha"], r["losses"], rtol=1e-6)
        err = np.abs(res.weight[k] - r["coef"]).max() / np.abs(r["coef"]).max()
        assert err <= 1e-4, (k, err)
    forms = {g["form"] for g in res.report["groups"]}
    assert forms == ({"primal", "dual"} if form == "auto" else {form})
    # objectives sharing a label mask share one accumulation: 4 sources, 4 groups for 5 objectives...
    # ...except objective 1, labelled by two sources, which has its own mask
    assert sorted(len(g["objectives"]) for g in res.report["groups"]) == [1, 1, 1, 2]
    bf16 = gram == "bf16" or (gram == "auto" and solver in ("auto", "mixed")
                              and ridge.bf16_gemm_kernel() is not None)
    for g in res.report["groups"]:
        if g["form"] == "primal" and bf16:  # bf16 X^T X, then corrected against the exact rows
            assert g["gram"] == "bf16, refined" and 1 <= g["exact_passes"] <= 3
            assert g["estimated_rel_error"] <= 1e-9 and g["corrections"][0] < 1e-3
        else:
            assert g["gram"] == "float64" and "exact_passes" not in g


def spd(n, eigenvalues, seed=0):
    """A symmetric matrix with the given spectrum (random orthogonal eigenvectors), and a right-hand side."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    return (Q * eigenvalues) @ Q.T, rng.normal(size=(n, 3)) * [1.0, 1e-3, 1e3]


def direct(M, B, a):
    return np.linalg.solve(M + a * np.eye(len(M)), B)


def rel(x, ref):
    return float(np.max(np.abs(x - ref).max(axis=0) / np.abs(ref).max(axis=0)))


@pytest.mark.parametrize("threads", [1, 2])
def test_mixed_solver_equals_float64_solves(threads):
    """float32 factors + float64 refinement give the float64 answer; alphas below the spectrum share a factor."""
    alphas = DEFAULT_ALPHAS
    M, B = spd(120, np.geomspace(5.0, 5e4, 120))
    W, info, ms = ridge.solve_all_alphas(M, B, alphas, "mixed", threads)
    for w, a in zip(W, alphas):
        assert rel(w, direct(M, B, a)) < 1e-9, a
    # 1e-4 .. 1e-1 are far below the smallest eigenvalue (5): one factorization serves them
    assert info["float32 factorizations"] <= len(alphas) - 3 and info["float64 factorizations"] == 0
    assert all(ms.fac[i] is ms.fac[0] for i in range(4))
    # later solves (corrections) reuse the factors: any right-hand sides, float64 answers again
    R = [B * (i + 1) for i in range(len(alphas))]
    for w, r, a in zip(ms.solve(R), R, alphas):
        assert rel(w, direct(M, r, a)) < 1e-9
    # a zero right-hand side column is solved by zeros
    B0 = B.copy()
    B0[:, 1] = 0
    W0, _, _ = ridge.solve_all_alphas(M, B0, alphas, "mixed", threads)
    assert all(not w[:, 1].any() for w in W0)


def test_mixed_solver_ill_conditioned_uses_float64_factors():
    # condition numbers up to 1e13 at alpha 1e-4: float32 factors cannot refine, float64 ones can
    alphas = DEFAULT_ALPHAS
    M, B = spd(80, np.geomspace(1e-9, 1e9, 80), seed=1)
    W, info, _ = ridge.solve_all_alphas(M, B, alphas, "mixed")
    assert info["mixed"] == 1 and info["float64 factorizations"] >= 1
    for w, a in zip(W, alphas):
        ref = direct(M, B, a)
        cond = (1e9 + a) / (1e-9 + a)
        assert rel(w, ref) < max(1e-9, cond * 1e-14), a  # float64 accuracy for that conditioning
    # numerically singular (negative eigenvalues from rounding): no Cholesky factor exists -> eigh
    S, B = spd(40, np.r_[np.full(20, -1e-6), np.geomspace(1.0, 1e3, 20)], seed=2)
    W, info, ms = ridge.solve_all_alphas(S, B, [1e-12, 1.0], "mixed")
    assert info == {"eigh": 1} and ms is None
    lam, Q = np.linalg.eigh(S)
    np.testing.assert_allclose(W[1], Q @ ((Q.T @ B) / (np.maximum(lam, 0) + 1.0)[:, None]), rtol=1e-9)


def test_lapack_wrapper_matches_numpy():
    lapack = ridge.scipy_lapack()
    assert lapack is not None  # scipy is a test dependency: the fast solver is tested, not skipped
    M, B = spd(50, np.geomspace(1.0, 100.0, 50), seed=3)
    for dt, tol in ((np.float32, 1e-4), (np.float64, 1e-12)):
        L = M.astype(dt)
        assert lapack.potrf(L) == 0
        np.testing.assert_allclose(np.triu(L).T, np.linalg.cholesky(M), rtol=0, atol=tol * 10)
        assert rel(lapack.potrs(L, B), np.linalg.solve(M, B)) < tol
    bad = -np.eye(4)
    assert lapack.potrf(bad) == 1  # not positive definite: LAPACK's info names the failing column
    with pytest.raises(ValueError, match="C-contiguous square"):
        lapack.potrf(np.eye(4)[:, :3].copy())
    with pytest.raises(ValueError, match="C-contiguous square"):
        lapack.potrf(np.asfortranarray(np.eye(4))[:, ::2])
    with pytest.raises(ValueError, match="do not fit a 50 x 50 factor"):
        lapack.potrs(L, B[:10])


def test_bf16_gram_refinement_equals_float64_gram(synth, tmp_path, monkeypatch):
    X, Y, glob, ref = synth
    if ridge.bf16_gemm_kernel() is None:
        pytest.skip("this CPU has no AVX512_BF16: gram='bf16' is refused (test_ridge_matches_sklearn checks that)")
    exact = stage1.train(glob, gram="float64")
    fast = stage1.train(glob, gram="bf16", chunk_rows=333, max_workers=1)
    assert [e["alpha"] for e in fast.report["objectives"]] == [e["alpha"] for e in exact.report["objectives"]]
    for e, f in zip(exact.report["objectives"], fast.report["objectives"]):
        np.testing.assert_allclose(f["val_mse_by_alpha"], e["val_mse_by_alpha"], rtol=1e-9)
    assert rel(fast.weight.T.astype(np.float64), exact.weight.T.astype(np.float64)) < 1e-6  # float32 rounding
    # a refinement that does not get below the tolerance: the mask is accumulated again in float64
    monkeypatch.setattr(stage1, "_REFINE_TOL", 0.0)
    slow = stage1.train(glob, gram="bf16")
    primal = [g for g in slow.report["groups"] if g["form"] == "primal"]
    assert primal and all(g["gram"] == "float64 (bf16 refinement too slow)" for g in primal)
    np.testing.assert_array_equal(slow.weight, exact.weight)


def test_gram_and_solver_choices(synth, tmp_path, monkeypatch):
    X, Y, glob, _ = synth
    f32 = write_parts(tmp_path / "f32", X, Y, parts=2)
    with pytest.raises(ValueError, match="gram='bf16' is not available: the embeddings are not bf16"):
        stage1.train(f32, gram="bf16")
    with pytest.raises(ValueError, match="gram='bf16' is not available: it needs the mixed solver"):
        stage1.train(glob, gram="bf16", solver="cholesky")
    with pytest.raises(ValueError, match="gram must be auto, bf16 or float64"):
        stage1.train(glob, gram="fp16")
    res = stage1.train(f32)
    assert {g["gram"] for g in res.report["groups"]} == {"float64"} and res.report["solver"] == "mixed"
    # without threadpoolctl: no thread pool (BLAS's own threads), the same answer
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "threadpoolctl", None)  # import fails
        alone = stage1.train(f32)
    np.testing.assert_allclose(alone.weight, res.weight, rtol=0, atol=1e-6 * np.abs(res.weight).max())
    # without scipy: one float64 Cholesky factorization per alpha, float64 X^T X
    monkeypatch.setattr(ridge, "scipy_lapack", lambda: None)
    res = stage1.train(glob)
    assert res.report["solver"] == "cholesky" and {g["gram"] for g in res.report["groups"]} == {"float64"}
    with pytest.raises(ValueError, match="solver='mixed' needs scipy"):
        stage1.train(glob, solver="mixed")


def test_train_is_independent_of_file_split_and_chunking(synth, tmp_path):
    X, Y, glob, _ = synth
    base = stage1.train(glob)
    one = write_parts(tmp_path / "one", X, Y, parts=1, dtypes={"embeddings": "BF16"})
    for g, chunk, workers in ((one, 4096, None), (one, 77, 1), (glob, 1, 3)):
        r = stage1.train(g, chunk_rows=chunk, max_workers=workers)
        np.testing.assert_allclose(r.weight, base.weight, rtol=0, atol=1e-6 * np.abs(base.weight).max())
        assert [e["alpha"] for e in r.report["objectives"]] == [e["alpha"] for e in base.report["objectives"]]


def test_train_outputs_and_cli(synth, tmp_path, capsys):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file as torch_load
    X, Y, glob, ref = synth
    out = tmp_path / "reg" / "regression.safetensors"
    rc = cli.main(["train-stage1", "--embeddings", glob, "--output", str(out), "--objectives", *OBJ])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "a-x" in printed and "val MSE" in printed and "primal" in printed and "dual" in printed
    w = torch_load(str(out))["regression_layer.weight"]
    assert w.dtype == torch.float32 and tuple(w.shape) == (5, X.shape[1])
    rep = json.loads((tmp_path / "reg" / "regression.json").read_text())
    assert [e["objective"] for e in rep["objectives"]] == OBJ
    assert [e["alpha"] for e in rep["objectives"]] == [r["alpha"] for r in ref]
    assert rep["rows"] == len(X) and rep["train_rows"] + rep["val_rows"] == len(X)
    for e in rep["objectives"]:
        assert set(e) >= {"objective", "alpha", "val_mse", "train_count", "val_count"}
    # names come from the files' metadata when present
    named = write_parts(tmp_path / "named", X, Y, parts=2, names=OBJ)
    assert stage1.train(named).objectives == OBJ
    assert stage1.train(glob).objectives == [f"objective-{k}" for k in range(5)]


# ----------------------------------------------------------------------------- train: bad input


def test_train_mismatched_counts(tmp_path):
    save_file({"embeddings": np.zeros((5, 4), np.float32), "labels": np.zeros((4, 2), np.float32)},
              tmp_path / "x-00001-of-00001.safetensors")
    with pytest.raises(ValueError, match=r"x-00001-of-00001.safetensors: 5 embeddings but 4 label rows"):
        stage1.train(str(tmp_path))
    assert cli.main(["train-stage1", "--embeddings", str(tmp_path), "--output", str(tmp_path / "w")]) == 2


def test_train_inconsistent_files_and_bad_values(tmp_path):
    X, Y = synthetic(scale=0.2, H=8)
    write_parts(tmp_path / "a", X, Y, parts=1)
    save_file({"embeddings": np.zeros((3, 9), np.float32), "labels": np.zeros((3, 5), np.float32)},
              tmp_path / "a" / "z.safetensors")
    with pytest.raises(ValueError, match="does not match the first file's hidden size 8"):
        stage1.train(str(tmp_path / "a"))
    Y2 = Y.copy()
    Y2[10, 2] = np.inf
    write_parts(tmp_path / "b", X, Y2, parts=1)
    with pytest.raises(ValueError, match="row 10, objective column 2: infinite label"):
        stage1.train(str(tmp_path / "b"))
    X2 = X.copy()
    X2[33, 1] = np.nan
    write_parts(tmp_path / "c", X2, Y, parts=1)
    with pytest.raises(ValueError, match="row 33: the embedding has a NaN"):
        stage1.train(str(tmp_path / "c"))
    X2[33, 1] = 0.0
    X2[250, 7] = -np.inf
    write_parts(tmp_path / "c16", X2, Y, parts=2, dtypes={"embeddings": "BF16"})
    with pytest.raises(ValueError, match=r"data-00002-of-00002.safetensors: row 33: the embedding has a NaN"):
        stage1.train(str(tmp_path / "c16"))
    with pytest.raises(FileNotFoundError, match="no files match"):
        stage1.train(str(tmp_path / "nothing-*.safetensors"))
    save_file({"embeddings": np.zeros((3, 8), np.float32)}, tmp_path / "d.safetensors")
    with pytest.raises(ValueError, match="no tensor named 'labels'"):
        stage1.train(str(tmp_path / "d.safetensors"))
    good = write_parts(tmp_path / "e", X, Y, parts=2)
    with pytest.raises(ValueError, match="3 objective names given, but the labels have 5"):
        stage1.train(good, objectives=["p", "q", "r"])
    with pytest.raises(ValueError, match="alphas must be positive"):
        stage1.train(good, alphas=[1.0, 0.0])


def test_objective_without_labels_is_an_error_or_a_marked_skip(tmp_path):
    X, Y = synthetic(scale=0.5, H=8)
    Y[:, 2] = np.nan                      # no labels at all
    Y[:, 4] = np.nan
    _, val = train_test_split_indices(len(X), 0.2, 42)
    Y[val[:3], 4] = 1.0                   # labels only in the validation split
    g = write_parts(tmp_path / "d", X, Y, parts=2)
    with pytest.raises(ValueError) as ei:
        stage1.train(g)
    msg = str(ei.value)
    assert "objective-2 (no labels at all)" in msg and "objective-4 (no labels among the training rows)" in msg
    assert "skip_unlabeled" in msg
    assert cli.main(["train-stage1", "--embeddings", g, "--output", str(tmp_path / "w.safetensors")]) == 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = stage1.train(g, tmp_path / "w.safetensors", skip_unlabeled=True)
    assert sorted(str(w.message) for w in caught) == [
        "objective objective-2 (no labels at all): skipped, its weight row is zero",
        "objective objective-4 (no labels among the training rows): skipped, its weight row is zero"]
    assert not res.weight[2].any() and not res.weight[4].any() and res.weight[0].any()
    rep = json.loads((tmp_path / "w.json").read_text())
    assert rep["objectives"][2]["skipped"] and rep["objectives"][2]["reason"] == "no labels at all"
    assert rep["objectives"][4]["skipped"] and "training" in rep["objectives"][4]["reason"]
    assert len(rep["warnings"]) == 2
    assert "skipped: no labels at all" in res.table()


# ----------------------------------------------------------------------------- prepare: end to end

@pytest.fixture(scope="module")
def tiny(tmp_path_factory, llama3_dir):
    d = tmp_path_factory.mktemp("stage1") / "tiny-backbone"
    make_backbone(d, vocab=128257, pad_token_id=128256, hidden=24, heads=4, kv_heads=2, inter=40, layers=2)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(llama3_dir / f, d / f)
    data = write_jsonl(d.parent / "mo-data.jsonl", make_records(60))
    return d, data


def run_prepare(tiny, out, **kw):
    model, data = tiny
    kw.setdefault("objectives", OBJ)
    kw.setdefault("chunk_rows", 16)
    kw.setdefault("num_threads", 1)
    kw.setdefault("progress", False)
    kw.setdefault("quiet", True)
    return stage1.prepare(str(model), str(kw.pop("dataset", data)), str(out), **kw)


def rows_of(path):
    d = load_file(path, as_float32=True)
    return d["embeddings"], d["labels"]


@pytest.fixture(scope="module")
def unsharded(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("prep1")
    return run_prepare(tiny, out)


def test_prepare_one_shard_contents(tiny, unsharded):
    model_dir, data = tiny
    assert os.path.basename(unsharded) == "mo-data-00001-of-00001.safetensors"
    f = SafetensorsFile(unsharded)
    assert f.info("embeddings").dtype == "BF16" and f.info("embeddings").shape == (60, 24)   # the reference's dtype
    assert f.info("labels").dtype == "F32" and f.info("labels").shape == (60, 5)
    assert json.loads(f.metadata["objectives"]) == OBJ
    assert not any(p.name.startswith(".") for p in Path(unsharded).parent.iterdir())  # work dir removed
    emb, lab = rows_of(unsharded)
    # row order: default_rng(0).permutation, as datasets' shuffle(seed=0)
    recs = make_records(60)
    order = np.random.default_rng(0).permutation(60)
    want = np.array([[np.nan if recs[i][o] is None else recs[i][o] for o in OBJ] for i in order], dtype=np.float32)
    np.testing.assert_array_equal(lab, want)
    # embeddings: the backbone's last-token hidden state of the chat-formatted conversation, one BOS
    tok = armorm.ChatTokenizer.from_pretrained(model_dir)
    rm = armorm.ArmoRM.from_pretrained(model_dir, architecture="LlamaModel", torch_dtype="bfloat16", num_threads=1)
    convs = [recs[i]["messages"] for i in order]
    ids = armorm.tokenizer.format_conversations(tok, convs)
    for s in ids:
        assert s[0] == 128000 and s[1] != 128000
    # the reference's FsfairX path: render, drop the BOS text, tokenize with special tokens -> the same ids
    for c, s in zip(convs[:10], ids):
        text = tok.apply_chat_template(c, tokenize=False).replace(tok.bos_token, "")
        assert tok(text)["input_ids"] == s
    hs = rm.score_sequences(ids, fields=["hidden_state"])["hidden_state"]
    np.testing.assert_array_equal(emb, bf16_to_float32(float32_to_bf16(hs)))


def test_embed_chunk_is_one_chunk_of_prepare(tiny, unsharded):
    """The per-chunk work by itself (what a distributed runner calls) gives the rows prepare wrote."""
    from armorm.data import open_dataset
    from armorm.train import prepare as prep
    model_dir, data = tiny
    src = open_dataset(str(data))
    rows = np.random.default_rng(0).permutation(60)[16:32]  # the second chunk of 16
    rm = prep.load_backbone(str(model_dir), "bfloat16", 1, 8192)
    seen = []
    chunk = prep.embed_chunk(stage1.Stage1Kind(OBJ), rm, src.take(rows), [src.where(int(r)) for r in rows], rows,
                             batch_tokens=100, report=lambda n, t: seen.append((n, t)))
    emb, lab = rows_of(unsharded)
    np.testing.assert_array_equal(bf16_to_float32(float32_to_bf16(chunk.tensors["embeddings"])), emb[16:32])
    np.testing.assert_array_equal(chunk.tensors["labels"], lab[16:32])
    assert sum(n for n, _ in seen) == 16 and sum(t for _, t in seen) == int(chunk.metadata["tokens"])


@pytest.mark.parametrize("mode", ["contiguous", "strided"])
def test_prepare_two_shards_equal_one(tiny, unsharded, tmp_path, mode):
    paths = [run_prepare(tiny, tmp_path, n_shards=2, shard_idx=i, shard_mode=mode, batch_tokens=64)
             for i in (1, 2)]
    assert [os.path.basename(p) for p in paths] == ["mo-data-00001-of-00002.safetensors",
                                                   "mo-data-00002-of-00002.safetensors"]
    parts = [rows_of(p) for p in paths]
    emb = np.concatenate([p[0] for p in parts])
    lab = np.concatenate([p[1] for p in parts])
    e1, l1 = rows_of(unsharded)
    assert len(emb) == 60
    if mode == "contiguous":  # shards are consecutive blocks of the shuffled order
        np.testing.assert_array_equal(emb, e1)
        np.testing.assert_array_equal(lab, l1)

    def as_set(e, lab_):
        return sorted(row.tobytes() for row in np.concatenate([e, np.nan_to_num(lab_, nan=-999.0)], axis=1))

    assert as_set(emb, lab) == as_set(e1, l1)
    # training on the two shards equals training on the one file (contiguous: the same row order)
    if mode == "contiguous":
        a = stage1.train(str(tmp_path / "*.safetensors"), alphas=[0.1, 10.0], val_fraction=0.25)
        b = stage1.train(unsharded, alphas=[0.1, 10.0], val_fraction=0.25)
        np.testing.assert_array_equal(a.weight, b.weight)
        assert a.objectives == OBJ


def test_prepare_resume_after_interruption(tiny, unsharded, tmp_path):
    calls = {"n": 0}

    def interrupt(done, total, tokens):
        assert tokens > 0 and total == 60
        calls["n"] += 1
        if done >= 35:
            raise KeyboardInterrupt("simulated")

    with pytest.raises(KeyboardInterrupt):
        run_prepare(tiny, tmp_path, progress=interrupt, batch_tokens=100)
    work = tmp_path / ".mo-data-00001-of-00001.safetensors.partial"
    assert not (tmp_path / "mo-data-00001-of-00001.safetensors").exists()
    stale = tmp_path / ".mo-data-00001-of-00001.safetensors.abc123.tmp"  # as left by a kill during the final write
    stale.write_bytes(b"partial")
    chunks = sorted(p.name for p in work.glob("chunk-*.safetensors"))
    assert chunks == ["chunk-000000.safetensors", "chunk-000001.safetensors"]  # 32 rows finished, chunk 3 not
    seen = []
    path = run_prepare(tiny, tmp_path, progress=lambda d, t, k: seen.append(d), batch_tokens=300)
    assert seen[0] > 32 and seen[-1] == 60  # resumed after the two finished chunks
    assert Path(path).read_bytes() == Path(unsharded).read_bytes()
    assert not work.exists() and not stale.exists()
    # running again: the finished file is returned, nothing recomputed
    assert run_prepare(tiny, tmp_path, progress=lambda *a: pytest.fail("recomputed")) == path


def test_prepare_resume_refuses_other_settings(tiny, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        run_prepare(tiny, tmp_path, progress=lambda d, t, k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(ValueError, match="interrupted run with different settings.*embeddings_dtype"):
        run_prepare(tiny, tmp_path, embeddings_dtype="float32")
    path = run_prepare(tiny, tmp_path, embeddings_dtype="float32", restart=True)
    assert SafetensorsFile(path).info("embeddings").dtype == "F32"
    with pytest.raises(ValueError, match="exists with different settings.*seed"):
        run_prepare(tiny, tmp_path, embeddings_dtype="float32", seed=1)
    path2 = run_prepare(tiny, tmp_path, embeddings_dtype="float32", seed=1, overwrite=True)
    assert path2 == path and json.loads(SafetensorsFile(path).metadata["armorm_stage1"])["seed"] == 1


def test_prepare_reads_the_backbone_of_an_armorm_checkpoint(tiny, tmp_path):
    model, data = tiny
    d = tmp_path / "ArmoRM-tiny"
    make_armorm(d, vocab=128257, pad_token_id=128256, hidden=24, heads=4, kv_heads=2, inter=40, layers=2,
                gating_hidden=8)  # same seed and shapes: the same backbone weights as `tiny`
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(model / f, d / f)
    kw = dict(torch_dtype="float32", embeddings_dtype="float32", n_shards=3, shard_idx=2)
    a = rows_of(stage1.prepare(str(d), str(data), str(tmp_path / "a"), objectives=OBJ, num_threads=1,
                               progress=False, quiet=True, **kw))
    b = rows_of(run_prepare(tiny, tmp_path / "b", **kw))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_prepare_fp32_embeddings_are_the_unrounded_bf16_ones(tiny, unsharded, tmp_path):
    e32, l32 = rows_of(run_prepare(tiny, tmp_path, embeddings_dtype="float32"))
    e16, l16 = rows_of(unsharded)
    np.testing.assert_array_equal(bf16_to_float32(float32_to_bf16(e32)), e16)
    np.testing.assert_array_equal(l32, l16)


def test_prepare_parquet_and_datasets_sources(tiny, unsharded, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    recs = make_records(60)
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "mo-data.parquet")
    path = run_prepare(tiny, tmp_path / "out", dataset=tmp_path / "mo-data.parquet")
    e, lab = rows_of(path)
    e1, l1 = rows_of(unsharded)
    np.testing.assert_array_equal(e, e1)
    np.testing.assert_array_equal(lab, l1)
    with pytest.raises(DatasetError, match="no column.*nope"):
        run_prepare(tiny, tmp_path / "out2", dataset=tmp_path / "mo-data.parquet", objectives=["a-x", "nope"])


def test_prepare_cli(tiny, unsharded, tmp_path, capsys):
    model, data = tiny
    rc = cli.main(["prepare-stage1", "--model", str(model), "--dataset", str(data), "--output", str(tmp_path),
                   "--objectives", ",".join(OBJ), "--n-shards", "3", "--shard-idx", "3", "--threads", "1",
                   "--no-progress", "--name", "mine"])
    assert rc == 0
    path = capsys.readouterr().out.strip()
    assert path == str(tmp_path / "mine-00003-of-00003.safetensors")
    e, _ = rows_of(path)
    np.testing.assert_array_equal(e, rows_of(unsharded)[0][40:])
    rc = cli.main(["prepare-stage1", "--model", str(model), "--dataset", str(data), "--output", str(tmp_path),
                   "--n-shards", "3", "--shard-idx", "4"])
    assert rc == 2 and "1-based" in capsys.readouterr().err


# ----------------------------------------------------------------------------- prepare: bad input


@pytest.mark.parametrize("bad,match", [
    (lambda r: r.pop("messages"), r"row 7 \(bad.jsonl line 9\): has no 'messages'"),
    (lambda r: r.__setitem__("b-x", "high"), r"row 7 \(bad.jsonl line 9\): objective 'b-x' has a label that is "
                                             r"not a number: 'high'"),
    (lambda r: r.__setitem__("a-x", [1.0]), r"row 7 .*objective 'a-x' has a label that is not a number"),
    (lambda r: r.__setitem__("messages", [{"role": "user"}]), r"row 7 .*message 0 must be a dict with string"),
    (lambda r: r.__setitem__("messages", []), r"row 7 .*'messages' must be a non-empty list"),
])
def test_prepare_bad_rows_are_named(tiny, tmp_path, bad, match):
    recs = make_records(20)
    bad(recs[7])
    data = write_jsonl(tmp_path / "bad.jsonl", recs)
    with pytest.raises(ValueError, match=match):
        run_prepare(tiny, tmp_path / "out", dataset=data, chunk_rows=64)
    assert cli.main(["prepare-stage1", "--model", str(tiny[0]), "--dataset", str(data), "--output",
                     str(tmp_path / "out"), "--objectives", *OBJ, "--threads", "1", "--no-progress"]) == 2


def test_prepare_bad_json_and_missing_inputs(tiny, tmp_path):
    (tmp_path / "broken.jsonl").write_text(json.dumps(make_records(1)[0]) + '\n{not json\n')
    with pytest.raises(DatasetError, match=r"broken.jsonl line 2\): not valid JSON"):
        run_prepare(tiny, tmp_path / "o", dataset=tmp_path / "broken.jsonl", seed=None)
    with pytest.raises(DatasetError, match="no such file"):
        run_prepare(tiny, tmp_path / "o", dataset=tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="embeddings_dtype"):
        run_prepare(tiny, tmp_path / "o", embeddings_dtype="int8")


def test_prepare_rejects_a_doubled_bos(tiny, tmp_path):
    model, data = tiny
    d = tmp_path / "doubled"
    shutil.copytree(model, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{{ bos_token }}" + cfg["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="starts with two BOS tokens"):
        stage1.prepare(str(d), str(data), str(tmp_path / "o"), objectives=OBJ, num_threads=1, progress=False,
                       quiet=True)


def test_prepare_warns_about_an_objective_with_no_labels(tiny, tmp_path):
    with pytest.warns(UserWarning, match="'typo' has no label in any of the 60 rows"):
        run_prepare(tiny, tmp_path, objectives=OBJ + ["typo"])


def test_open_dataset_kinds(tmp_path):
    recs = make_records(5)
    (tmp_path / "arr.json").write_text(json.dumps(recs))
    src = open_dataset(tmp_path / "arr.json")
    assert len(src) == 5 and src.take([3])[0]["id"] == 3 and src.name == "arr"
    src = open_dataset(write_jsonl(tmp_path / "x.jsonl", recs))
    assert len(src) == 5 and [r["id"] for r in src.take([4, 0])] == [4, 0]
    assert src.where(0) == "row 0 (x.jsonl line 1)"
    with pytest.raises(DatasetError, match="no such file"):
        open_dataset("./nope/data.jsonl")
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install datasets"):
            open_dataset("someone/some-dataset")
