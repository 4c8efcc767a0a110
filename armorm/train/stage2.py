"""ArmoRM training, stage 2: pair embeddings, verbosity debiasing, the gating network.

`prepare(model, dataset, output)` -- the reference's `stage-2_prepare.py`,
with real per-shard file names. Each row is a preference pair: `chosen` and
`rejected` message lists, or a `prompt` string plus `chosen` / `rejected`
response strings (wrapped as one user and one assistant message). Both sides
are formatted with the model's chat template and run through the frozen
backbone (packed, no padding); kept per side: the final hidden state of the
last token and the one at the gating position (the start of the header that
opens the final assistant turn). A pair with a side longer than `seq_len`
tokens is skipped and counted. Output
`<output>/<name>-<shard:05d>-of-<n_shards:05d>.safetensors` with
`embeddings` [N, 2, H], `prompt_embeddings` [N, 2, H] (index 0 = chosen),
`row_index` [N] (the dataset row), `id` [N] when the dataset has an integer
`id` column, and `subset` [N] (int32 codes; the names in the metadata key
`subsets`) when it has a `subset` column. Shuffling, sharding, chunked
resumable work and the atomic final write are stage 1's (see
`armorm.train.stage1`).

`train(preference, regression, output)` -- the reference's
`stage-2_train.py`, with its two defects fixed (docs/stage2.md, 'Defects of the public script'):

1. verbosity debiasing on a reference set (default: the preference set):
   `debias_penalties` / `reward_transform_matrix`;
2. the gating network, with a hand-written backward pass: input the prompt
   embedding (one per pair: chosen and rejected share the prompt), softmax
   over the K objectives, score computed from the transformed rewards
   `(E W^T) T`, Bradley-Terry loss. Its matmuls run on the C core's bf16
   GEMM (`_core.gemm`: operands rounded to bf16, fp32 sums, master weights
   and the optimizer in fp32, as mixed-precision training on a GPU) where
   the CPU has AVX512_BF16, else in NumPy float32 (`GatingConfig.backend`).

Everything is deterministic for a given `seed` (initialisation, batch
sampling, dropout) and `split_seed` (the 80/20 split, as scikit-learn's
`train_test_split(test_size=0.2, random_state=0)`).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..data import DatasetError, open_dataset
from ..model import default_num_threads
from ..safetensors_io import SafetensorsError, SafetensorsFile, save_file, to_float
from .stage1 import (EMBEDDING_DTYPES, ProgressArg, _Progress, _already_done, _chunk_path, _load_model, _log,
                     _model_fingerprint, _tokenize, _work_dir, _write_json_atomic, resolve_embedding_files,
                     shard_file_name, shard_rows, train_test_split_indices)

FORMAT_VERSION = 1
_META_KEY = "armorm_stage2"

#: The reference's penalty grid: 0, 0.01, 0.025, 0.05, ..., 0.15, then 0.2 .. 0.95 by 0.05.
PENALTY_GRID: List[float] = [0.0, 0.01, 0.025, 0.05, 0.075, 0.1, 0.125, 0.15] + \
    [round(0.2 + 0.05 * i, 2) for i in range(16)]
VERBOSITY_INDEX = 4
CORR_THRESHOLD = 0.03


# =========================================================================== prepare


def pair_conversations(rec: Dict[str, Any], where: str) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
    """(chosen, rejected) message lists of a pair record; DatasetError naming the row when malformed."""
    missing = [k for k in ("chosen", "rejected") if k not in rec or rec[k] is None]
    if missing:
        keys = ", ".join(sorted(map(str, rec))) or "none"
        raise DatasetError(f"{where}: the pair has no {' / '.join(repr(m) for m in missing)} side "
                           f"(its keys: {keys}); a pair needs 'chosen' and 'rejected'")
    out = []
    for side in ("chosen", "rejected"):
        v = rec[side]
        if isinstance(v, str):
            p = rec.get("prompt")
            if not isinstance(p, str):
                raise DatasetError(f"{where}: {side!r} is a string, so the row needs a string 'prompt' "
                                   f"(got {type(p).__name__})")
            conv = [{"role": "user", "content": p}, {"role": "assistant", "content": v}]
        elif isinstance(v, (list, tuple)) and v:
            conv = []
            for j, m in enumerate(v):
                if not isinstance(m, dict) or not isinstance(m.get("role"), str) or \
                        not isinstance(m.get("content"), str):
                    raise DatasetError(f"{where}: {side!r} message {j} must be a dict with string 'role' "
                                       "and 'content'")
                conv.append({"role": m["role"], "content": m["content"]})
        else:
            raise DatasetError(f"{where}: {side!r} must be a non-empty message list or a response string")
        out.append(conv)
    return out[0], out[1]


def _valid_chunk2(path: str, rows_in: int) -> bool:
    try:
        f = SafetensorsFile(path)
        return int(f.metadata.get("rows_in", -1)) == rows_in and "row_index" in f
    except (SafetensorsError, OSError, ValueError):
        return False


def prepare(model: Any, dataset: Any, output: Union[str, os.PathLike], *, n_shards: int = 1, shard_idx: int = 1,
            split: str = "train", name: Optional[str] = None, seq_len: int = 8192, batch_tokens: int = 8192,
            embeddings_dtype: str = "bfloat16", torch_dtype: str = "bfloat16", seed: Optional[int] = 0,
            shard_mode: str = "contiguous", chunk_rows: int = 512, num_threads: Optional[int] = None,
            progress: ProgressArg = None, overwrite: bool = False, restart: bool = False,
            quiet: bool = False, check_finite: bool = True) -> str:
    """Writes one shard of stage-2 pair embeddings; returns the file's path (see the module docstring).

    Arguments as `stage1.prepare`; `seq_len`: pairs with a side longer than
    this many tokens are skipped (counted in the summary and the file's
    metadata `skipped`). `seed=None` keeps the dataset order (RewardBench).
    """
    st_dtype = EMBEDDING_DTYPES.get(str(embeddings_dtype).replace("torch.", "").lower())
    if st_dtype is None:
        raise ValueError(f"embeddings_dtype must be 'bfloat16' or 'float32', got {embeddings_dtype!r}")
    embeddings_dtype = "bfloat16" if st_dtype == "BF16" else "float32"
    if chunk_rows < 1 or batch_tokens < 1 or seq_len < 1:
        raise ValueError("chunk_rows, batch_tokens and seq_len must be >= 1")
    src = open_dataset(dataset, split=split, columns=["prompt", "chosen", "rejected", "id", "subset"])
    cols = src.columns()
    if cols is not None:
        missing = [c for c in ("chosen", "rejected") if c not in cols]
        if missing:
            raise DatasetError(f"{src.location}: the dataset has no column(s) {', '.join(missing)} "
                               f"(it has {', '.join(cols)}); stage 2 needs preference pairs")
    N = len(src)
    rows = shard_rows(N, seed=seed, n_shards=n_shards, shard_idx=shard_idx, shard_mode=shard_mode)
    if rows.size == 0:
        raise ValueError(f"shard {shard_idx} of {n_shards} has no rows (the dataset has {N})")
    name = name or src.name
    if isinstance(model, (str, os.PathLike)):
        from ..hub import resolve_model_path
        model = str(resolve_model_path(model))
    output = os.fspath(output)
    os.makedirs(output, exist_ok=True)
    final = os.path.join(output, shard_file_name(name, shard_idx, n_shards))
    model_fp = _model_fingerprint(model)
    model_fp["dtype"] = str(torch_dtype) if isinstance(model, (str, os.PathLike)) else getattr(model, "dtype", None)
    settings = {"version": FORMAT_VERSION, "model": model_fp, "dataset": src.fingerprint(), "split": split,
                "seed": seed, "n_shards": n_shards, "shard_idx": shard_idx, "shard_mode": shard_mode,
                "seq_len": seq_len, "embeddings_dtype": embeddings_dtype, "rows": int(rows.size)}
    settings = json.loads(json.dumps(settings))
    if _already_done(final, settings, _META_KEY, "prepare-stage2", overwrite, quiet):
        return final
    work = _work_dir(output, final, settings, chunk_rows, restart)

    n_chunks = -(-rows.size // chunk_rows)
    bounds = [(c * chunk_rows, min(rows.size, (c + 1) * chunk_rows)) for c in range(n_chunks)]
    done = {c for c, (a, b) in enumerate(bounds) if _valid_chunk2(_chunk_path(work, c), b - a)}
    todo = [c for c in range(n_chunks) if c not in done]
    if done:
        _log(f"resuming: {len(done)} of {n_chunks} chunks already done in {work}", quiet)
    H = None
    if todo:
        rm = tok = None
        max_pos = 0
        done_rows = sum(bounds[c][1] - bounds[c][0] for c in done)
        bar = _Progress(progress, int(rows.size), done_rows, desc=f"embedding {os.path.basename(final)}",
                        unit="pair")
        try:
            for c in todo:
                a, b = bounds[c]
                idx = rows[a:b]
                recs = src.take(idx)
                wheres = [src.where(int(r)) for r in idx]
                convs, cw = [], []
                for rec, where in zip(recs, wheres):
                    ch, rj = pair_conversations(rec, where)
                    convs += [ch, rj]
                    cw += [f"{where} (chosen)", f"{where} (rejected)"]
                if rm is None:
                    rm = _load_model(model, torch_dtype, num_threads, batch_tokens, check_finite)
                    tok = rm.tokenizer
                    if tok is None:
                        raise ValueError(f"{rm.name_or_path} has no tokenizer (tokenizer.json); stage 2 formats "
                                         "conversations with the model's chat template")
                    max_pos = rm.config.max_position_embeddings
                seqs = _tokenize(tok, convs, cw)
                keep = [j for j in range(len(recs)) if seqs[2 * j].size <= seq_len and seqs[2 * j + 1].size <= seq_len]
                kseqs = [seqs[2 * j + s] for j in keep for s in (0, 1)]
                kw = [cw[2 * j + s] for j in keep for s in (0, 1)]
                for s, where in zip(kseqs, kw):
                    if s.size > max_pos:
                        raise DatasetError(f"{where}: the conversation has {s.size} tokens; the model allows at "
                                           f"most {max_pos} (max_position_embeddings); lower --seq-len to skip it")
                from ..model import GatingPatternError
                for s, where in zip(kseqs, kw):
                    try:
                        rm.gating_positions([s], what=where)
                    except GatingPatternError as e:
                        raise DatasetError(str(e).replace(f"{where} 0", where)) from None
                tensors: Dict[str, Any] = {}
                if kseqs:
                    cum = np.cumsum([s.size for s in kseqs])
                    state = {"n": 0}

                    def on_batch(n_done: int, _total: int) -> None:
                        prev = state["n"]
                        state["n"] = n_done
                        bar.update(0, int(cum[n_done - 1] - (cum[prev - 1] if prev else 0)))

                    out = rm.score_sequences(kseqs, fields=["hidden_state", "prompt_embedding"],
                                             batch_tokens=batch_tokens, progress=on_batch)
                    hs = np.asarray(out["hidden_state"], dtype=np.float32)
                    pe = np.asarray(out["prompt_embedding"], dtype=np.float32)
                    H = hs.shape[1]
                    tensors["embeddings"] = hs.reshape(len(keep), 2, H)
                    tensors["prompt_embeddings"] = pe.reshape(len(keep), 2, H)
                tensors["row_index"] = np.asarray(idx[keep], dtype=np.int64)
                ids = [recs[j].get("id") for j in keep]
                meta = {"rows_in": str(b - a), "skipped": str(len(recs) - len(keep))}
                if ids and all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in ids):
                    tensors["id"] = np.asarray(ids, dtype=np.int64)
                if any("subset" in r for r in recs):
                    meta["subset_values"] = json.dumps([str(recs[j].get("subset")) for j in keep])
                save_file(tensors, _chunk_path(work, c), metadata=meta,
                          dtypes={"embeddings": st_dtype, "prompt_embeddings": st_dtype})
                bar.update(b - a, 0)
        finally:
            bar.close()

    files = [SafetensorsFile(_chunk_path(work, c)) for c in range(n_chunks)]
    with_rows = [f for f in files if "embeddings" in f]
    if not with_rows:
        raise ValueError(f"every pair of shard {shard_idx} is longer than seq_len={seq_len} tokens; nothing to write")
    H = with_rows[0].info("embeddings").shape[2]
    n_kept = sum(f.info("row_index").shape[0] for f in files)
    skipped = sum(int(f.metadata.get("skipped", 0)) for f in files)
    has_id = all("id" in f for f in with_rows)
    subsets: Optional[List[str]] = None
    if any("subset_values" in f.metadata for f in files):
        subsets = [s for f in files for s in json.loads(f.metadata.get("subset_values", "[]"))]
    out: Dict[str, Any] = {
        "embeddings": (st_dtype, (n_kept, 2, H), (f.read("embeddings") for f in with_rows)),
        "prompt_embeddings": (st_dtype, (n_kept, 2, H), (f.read("prompt_embeddings") for f in with_rows)),
        "row_index": ("I64", (n_kept,), (f.read("row_index") for f in files)),
    }
    if has_id:
        out["id"] = ("I64", (n_kept,), (f.read("id") for f in with_rows))
    meta = {"format": "pt", _META_KEY: json.dumps(settings), "skipped": str(skipped), "seq_len": str(seq_len)}
    if subsets is not None:
        names = sorted(set(subsets))
        code = {s: i for i, s in enumerate(names)}
        out["subset"] = np.asarray([code[s] for s in subsets], dtype=np.int32)
        meta["subsets"] = json.dumps(names)
    save_file(out, final, metadata=meta)
    shutil.rmtree(work, ignore_errors=True)
    _log(f"wrote {n_kept} pairs [{n_kept}, 2, {H}] {embeddings_dtype} to {final}; "
         f"{skipped} pair(s) skipped (a side longer than {seq_len} tokens)", quiet)
    return final


# =========================================================================== reading prepared files


@dataclass
class PairData:
    """Stage-2 pairs read from prepared files (in sorted-path order)."""

    files: List[str]
    rewards: np.ndarray                  # [N, 2, K] float64: E W^T (untransformed)
    prompts: np.ndarray                  # [N, H] stored dtype (chosen side's prompt embedding)
    prompt_dtype: str
    subsets: Optional[List[str]] = None  # per row, when the files have them
    ids: Optional[np.ndarray] = None
    prompt_mismatch: float = 0.0         # max |prompt_chosen - prompt_rejected|


def _decode(raw: np.ndarray, st: str) -> np.ndarray:
    return to_float(raw, st, np.float32)


def read_pairs(files: Any, regression: np.ndarray, *, need_prompts: bool = True, chunk_rows: int = 2048) -> PairData:
    """Reads prepared pair files: rewards `E W^T` [N, 2, K] and the chosen side's prompt embeddings."""
    paths = resolve_embedding_files(files)
    W = np.asarray(regression, dtype=np.float32)
    if W.ndim != 2:
        raise ValueError(f"the regression weight must be [K, H], got shape {list(W.shape)}")
    K, H = W.shape
    rewards, prompts, subsets, ids = [], [], [], []
    have_subsets = have_ids = True
    mismatch = 0.0
    for p in paths:
        f = SafetensorsFile(p)
        for t in ("embeddings", "prompt_embeddings"):
            if t not in f:
                raise ValueError(f"{p}: no {t!r} tensor; is this a prepare-stage2 file?")
            sh = f.info(t).shape
            if len(sh) != 3 or sh[1] != 2:
                raise ValueError(f"{p}: {t} must be [N, 2, H], got {list(sh)}; is this a prepare-stage2 file "
                                 "(a stage-1 file has [N, H])?")
            if sh[2] != H:
                raise ValueError(f"{p}: {t} has hidden size {sh[2]}, but the regression weight is [{K}, {H}] "
                                 f"(hidden size {H}); were they made with the same backbone?")
        e, pe = f.info("embeddings"), f.info("prompt_embeddings")
        if e.shape[0] != pe.shape[0]:
            raise ValueError(f"{p}: {e.shape[0]} embeddings but {pe.shape[0]} prompt embeddings")
        n = e.shape[0]
        r = np.empty((n, 2, K), dtype=np.float64)
        pp = np.empty((n, H) if need_prompts else (0, H), dtype=np.uint16 if pe.dtype == "BF16" else np.float32)
        for a in range(0, n, chunk_rows):
            b = min(n, a + chunk_rows)
            x = _decode(f.read_rows("embeddings", a, b), e.dtype)
            bad = ~np.isfinite(x).reshape(b - a, -1).all(axis=1)
            if bad.any():
                raise ValueError(f"{p}: pair {a + int(np.flatnonzero(bad)[0])}: the embedding has a NaN or "
                                 "infinite value")
            r[a:b] = (x.reshape(-1, H) @ W.T).reshape(b - a, 2, K)
            if need_prompts:
                raw = f.read_rows("prompt_embeddings", a, b)
                xp = _decode(raw, pe.dtype)
                bad = ~np.isfinite(xp).reshape(b - a, -1).all(axis=1)
                if bad.any():
                    raise ValueError(f"{p}: pair {a + int(np.flatnonzero(bad)[0])}: the prompt embedding has a "
                                     "NaN or infinite value")
                mismatch = max(mismatch, float(np.abs(xp[:, 0] - xp[:, 1]).max()) if b > a else 0.0)
                pp[a:b] = raw[:, 0] if pp.dtype == raw.dtype else xp[:, 0]
        rewards.append(r)
        prompts.append(pp)
        if "subset" in f and "subsets" in f.metadata:
            names = json.loads(f.metadata["subsets"])
            subsets.extend(names[int(c)] for c in f.read("subset"))
        else:
            have_subsets = False
        if "id" in f:
            ids.append(f.read("id"))
        else:
            have_ids = False
    if len({pp.dtype for pp in prompts}) > 1:  # mixed stored dtypes: all float32
        prompts = [to_float(pp, "BF16") if pp.dtype == np.uint16 else pp for pp in prompts]
    P = np.concatenate(prompts, axis=0)
    pd = "BF16" if P.dtype == np.uint16 else "F32"
    return PairData(paths, np.concatenate(rewards, axis=0), P, pd, subsets if have_subsets else None,
                    np.concatenate(ids) if have_ids and ids else None, mismatch)


def load_regression(path: Union[str, os.PathLike]) -> Tuple[np.ndarray, Optional[List[str]]]:
    f = SafetensorsFile(path)
    if "regression_layer.weight" not in f:
        raise ValueError(f"{path}: no 'regression_layer.weight' tensor; is this a train-stage1 output?")
    t = f.info("regression_layer.weight")
    if len(t.shape) != 2:
        raise ValueError(f"{path}: regression_layer.weight must be [K, H], got {list(t.shape)}")
    W = to_float(f.read("regression_layer.weight"), t.dtype, np.float32)
    if not np.isfinite(W).all():
        raise ValueError(f"{path}: regression_layer.weight has NaN or infinite values")
    names = None
    try:
        names = json.loads(f.metadata.get("objectives", "null"))
    except ValueError:
        pass
    return W, names if isinstance(names, list) and len(names) == W.shape[0] else None


# =========================================================================== debiasing


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (scipy.stats.rankdata's 'average')."""
    x = np.asarray(x)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    n = xs.size
    new = np.concatenate([[True], xs[1:] != xs[:-1]]) if n else np.zeros(0, bool)
    starts = np.flatnonzero(new)
    ends = np.concatenate([starts[1:], [n]])
    avg = (starts + ends + 1) / 2.0  # average of ranks starts+1 .. ends
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def spearman(a: np.ndarray, b_ranks: np.ndarray) -> float:
    ra = rankdata(a)
    ra = ra - ra.mean()
    rb = b_ranks - b_ranks.mean()
    den = math.sqrt(float(ra @ ra) * float(rb @ rb))
    return float(ra @ rb) / den if den > 0 else float("nan")


def debias_penalties(R: np.ndarray, verbosity_index: int = VERBOSITY_INDEX, threshold: float = CORR_THRESHOLD,
                     grid: Sequence[float] = PENALTY_GRID) -> Tuple[np.ndarray, List[Optional[float]]]:
    """Per-objective penalties lambda from rewards R [M, K] (docs/stage2.md); also the chosen correlations.

    For i != v: the smallest grid value with spearman(R_i - lambda R_v, R_v) <= threshold;
    1 (the reference's initial value) when none qualifies, and for v itself.
    """
    R = np.asarray(R, dtype=np.float64)
    if R.ndim != 2:
        raise ValueError(f"rewards must be [M, K], got {list(R.shape)}")
    K = R.shape[1]
    if not 0 <= verbosity_index < K:
        raise ValueError(f"verbosity objective index {verbosity_index} is outside 0..{K - 1}")
    v = verbosity_index
    rv = rankdata(R[:, v])
    lam = np.ones(K, dtype=np.float64)
    corrs: List[Optional[float]] = [None] * K
    for i in range(K):
        if i == v:
            continue
        for g in grid:
            c = spearman(R[:, i] - g * R[:, v], rv)
            if c <= threshold:
                lam[i] = g
                corrs[i] = c
                break
    return lam, corrs


def reward_transform_matrix(lam: np.ndarray, verbosity_index: int = VERBOSITY_INDEX) -> np.ndarray:
    """T = I; T[v, :] -= lambda."""
    K = lam.size
    T = np.eye(K, dtype=np.float64)
    T[verbosity_index, :] -= lam
    return T


# =========================================================================== the gating network


@dataclass
class GatingConfig:
    hidden_dim: int = 1024
    n_hidden: int = 3
    temperature: float = 10.0
    dropout: float = 0.2
    logit_scale_init: float = 1.0
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: Tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    steps: int = 2000
    batch_size: int = 1024
    val_fraction: float = 0.2
    split_seed: int = 0
    seed: int = 0
    eval_every: int = 250
    backend: str = "auto"  # matmuls: "core" (bf16 GEMMs, fp32 sums), "numpy" (float32 BLAS), "auto"


def init_gating(H: int, K: int, cfg: GatingConfig, rng: np.random.Generator,
                dtype: Any = np.float32) -> Dict[str, np.ndarray]:
    """torch.nn.Linear's default init (U(+-1/sqrt(fan_in)) for weight and bias), logit_scale = init."""
    dims = [H] + [cfg.hidden_dim] * cfg.n_hidden + [K]
    p: Dict[str, np.ndarray] = {}
    for j in range(cfg.n_hidden + 1):
        bound = 1.0 / math.sqrt(dims[j])
        p[f"gating.layers.{j}.weight"] = rng.uniform(-bound, bound, (dims[j + 1], dims[j])).astype(dtype)
        p[f"gating.layers.{j}.bias"] = rng.uniform(-bound, bound, dims[j + 1]).astype(dtype)
    p["gating.logit_scale"] = np.full(1, cfg.logit_scale_init, dtype=dtype)
    return p


class NumpyMatmul:
    """The gating network's products in NumPy (float32 BLAS, or float64 for float64 inputs)."""

    name = "numpy"

    @staticmethod
    def _f(a: np.ndarray) -> np.ndarray:
        return (a.astype(np.uint32) << np.uint32(16)).view(np.float32) if a.dtype == np.uint16 else a

    def nt(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """a @ b^T"""
        return self._f(a) @ self._f(b).T

    def tn(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """a^T @ b"""
        return self._f(a).T @ self._f(b)

    def nn(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """a @ b"""
        return self._f(a) @ self._f(b)


class CoreMatmul:
    """The same products through the C core's `gemm`: operands rounded to bf16, products summed in fp32
    (vdpbf16ps), any layout without transposed copies. Mixed precision, as bf16 autocast on a GPU."""

    name = "core-bf16"

    def __init__(self, num_threads: int = 0) -> None:
        from .. import _core
        self._gemm = _core.gemm
        self.threads = int(num_threads)

    def nt(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return self._gemm(a, b, trans_b=True, num_threads=self.threads)

    def tn(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return self._gemm(a, b, trans_a=True, num_threads=self.threads)

    def nn(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return self._gemm(a, b, num_threads=self.threads)


def matmul_backend(name: str = "auto", num_threads: Optional[int] = None) -> Any:
    """'numpy', 'core' (bf16 GEMMs of the C core) or 'auto': 'core' where the CPU has AVX512_BF16
    (the core's portable fallback is slower than NumPy's BLAS), else 'numpy'."""
    if name not in ("auto", "numpy", "core"):
        raise ValueError(f"matmul backend must be 'auto', 'numpy' or 'core', got {name!r}")
    if name == "numpy":
        return NumpyMatmul()
    from .. import _core
    if name == "auto" and _core.gemm_kernel() == "portable":
        return NumpyMatmul()
    return CoreMatmul(num_threads or 0)


def gating_forward(params: Dict[str, np.ndarray], x: np.ndarray, n_hidden: int, temperature: float,
                   masks: Optional[Sequence[np.ndarray]] = None, keep_scale: float = 1.0,
                   cache: Optional[Dict[str, Any]] = None, mm: Any = None) -> np.ndarray:
    """Gating output softmax(z / T) * logit_scale [B, K]; `masks` (train mode): dropout keep-masks per hidden layer.

    `keep_scale` = 1 / (1 - p). `cache` (a dict) receives what the backward pass needs. `mm`: the
    matmul backend (default NumPy); x may be bf16 bits (uint16).
    """
    mm = mm or NumpyMatmul()
    h = x
    hs = [x]
    for j in range(n_hidden + 1):
        z = mm.nt(h, params[f"gating.layers.{j}.weight"])
        z += params[f"gating.layers.{j}.bias"]
        if j < n_hidden:
            np.maximum(z, 0, out=z)
            if masks is not None:
                z *= masks[j]
                if keep_scale != 1.0:
                    z *= z.dtype.type(keep_scale)
            hs.append(z)
        h = z
    z = h / h.dtype.type(temperature)
    z -= z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    if cache is not None:
        cache["hs"] = hs
        cache["softmax"] = z
    return z * params["gating.logit_scale"][0]


def bt_loss_and_grad(params: Dict[str, np.ndarray], x: np.ndarray, delta: np.ndarray, n_hidden: int,
                     temperature: float, masks: Optional[Sequence[np.ndarray]] = None, keep_scale: float = 1.0,
                     want_grad: bool = True, mm: Any = None
                     ) -> Tuple[float, Optional[Dict[str, np.ndarray]], np.ndarray]:
    """Bradley-Terry loss mean(softplus(-d)), d = sum_k g_k delta_k, delta = (r_chosen - r_rejected) T.

    Returns (loss, gradients by parameter name, d). The backward pass is written out:
    softmax over the objectives, the temperature, logit_scale, ReLU and dropout.
    """
    mm = mm or NumpyMatmul()
    cache: Dict[str, Any] = {}
    g = gating_forward(params, x, n_hidden, temperature, masks, keep_scale, cache, mm)
    d = np.einsum("bk,bk->b", g, delta)
    loss = float(np.mean(np.logaddexp(0.0, -d.astype(np.float64))))
    if not want_grad:
        return loss, None, d
    B = x.shape[0]
    s = cache["softmax"]
    ls = params["gating.logit_scale"][0]
    dd = (-0.5 * (1 - np.tanh(0.5 * d)) / B).astype(s.dtype)  # d/dd softplus(-d) / B = -sigmoid(-d) / B
    dg = dd[:, None] * delta
    grads: Dict[str, np.ndarray] = {}
    grads["gating.logit_scale"] = np.array([np.sum(dg * s)], dtype=params["gating.logit_scale"].dtype)
    ds = dg * ls
    dz = s * (ds - np.sum(ds * s, axis=1, keepdims=True))
    dz *= dz.dtype.type(1.0 / temperature)
    hs = cache["hs"]
    for j in range(n_hidden, -1, -1):
        hin = hs[j]
        grads[f"gating.layers.{j}.weight"] = mm.tn(dz, hin)
        grads[f"gating.layers.{j}.bias"] = dz.sum(axis=0)
        if j == 0:
            break
        dh = mm.nn(dz, params[f"gating.layers.{j}.weight"])
        # hin = relu(z) * mask * keep_scale: zero where hin == 0 (relu off or dropped), scaled elsewhere
        dh *= (hin > 0)
        if masks is not None and keep_scale != 1.0:
            dh *= dh.dtype.type(keep_scale)
        dz = dh
    return loss, grads, d


class AdamW:
    """torch.optim.AdamW's update (decoupled weight decay, bias correction), in place.

    `fused=True`: float32 parameters are updated by the C core in one pass each (same arithmetic).
    """

    def __init__(self, params: Dict[str, np.ndarray], lr: float, betas: Tuple[float, float], eps: float,
                 weight_decay: float, fused: bool = False, num_threads: int = 1) -> None:
        self.lr, self.b1, self.b2, self.eps, self.wd = lr, betas[0], betas[1], eps, weight_decay
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}
        self.t = 0
        self.threads = max(1, int(num_threads))
        self._fused_update = None
        if fused:
            from .. import _core
            self._fused_update = _core.adamw_update

    def step(self, params: Dict[str, np.ndarray], grads: Dict[str, np.ndarray], lr: float) -> None:
        self.t += 1
        bc1 = 1 - self.b1 ** self.t
        bc2 = 1 - self.b2 ** self.t
        for k, p in params.items():
            g = grads[k]
            m, v = self.m[k], self.v[k]
            if self._fused_update is not None and p.dtype == np.float32:
                self._fused_update(p, np.ascontiguousarray(g, dtype=np.float32), m, v, lr=lr, beta1=self.b1,
                                   beta2=self.b2, eps=self.eps, weight_decay=self.wd, step=self.t,
                                   num_threads=self.threads)
                continue
            if self.wd:
                p *= p.dtype.type(1 - lr * self.wd)
            m *= self.b1
            m += (1 - self.b1) * g
            v *= self.b2
            v += (1 - self.b2) * (g * g)
            denom = np.sqrt(v)
            denom /= p.dtype.type(math.sqrt(bc2))
            denom += p.dtype.type(self.eps)
            p -= p.dtype.type(lr / bc1) * (m / denom)


def cosine_lr(lr: float, step: int, total: int) -> float:
    """CosineAnnealingLR(T_max=total, eta_min=0) before `step` scheduler steps."""
    return lr * (1 + math.cos(math.pi * step / total)) / 2


def dropout_masks(rng: np.random.Generator, B: int, D: int, n_hidden: int, p: float,
                  dtype: Any = np.float32) -> Optional[List[np.ndarray]]:
    if p <= 0:
        return None
    return [(rng.random((B, D), dtype=np.float32) >= p).astype(dtype) for _ in range(n_hidden)]


def pair_accuracy(d: np.ndarray) -> float:
    """Fraction of pairs with score(chosen) > score(rejected) (ties are wrong)."""
    return float(np.mean(d > 0)) if d.size else float("nan")


@dataclass
class Stage2Result:
    params: Dict[str, np.ndarray]
    transform: np.ndarray
    penalties: np.ndarray
    report: Dict[str, Any]
    output: Optional[str] = None
    history: List[Dict[str, float]] = field(default_factory=list)

    def table(self) -> str:
        r = self.report
        lines = [f"verbosity debiasing (objective {r['verbosity_index']}, threshold {r['corr_threshold']}):"]
        for e in r["penalties"]:
            c = "-" if e["spearman"] is None else f"{e['spearman']:+.4f}"
            lines.append(f"  {e['objective']:<40} lambda {e['lambda']:<6g} spearman {c}")
        t = r["training"]
        lines.append(f"gating: {t['steps']} steps x {t['batch_size']} pairs, {r['train_pairs']} train / "
                     f"{r['val_pairs']} validation pairs, {t['seconds']:.1f} s ({t['seconds_per_step'] * 1e3:.0f} "
                     "ms/step)")
        lines.append(f"final training loss {t['final_loss']:.4f}; validation accuracy {r['val_accuracy'] * 100:.2f}% "
                     f"(fixed uniform weighting: {r['val_accuracy_uniform'] * 100:.2f}%)")
        return "\n".join(lines)


def _blas_limit(threads: Optional[int]):
    if threads is None:
        import contextlib
        return contextlib.nullcontext()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        import contextlib
        return contextlib.nullcontext()
    return threadpool_limits(limits=int(threads), user_api="blas")


def _rows_f32(P: np.ndarray, idx: np.ndarray) -> np.ndarray:
    x = P[idx]
    if x.dtype == np.uint16:
        return (x.astype(np.uint32) << np.uint32(16)).view(np.float32)
    return x.astype(np.float32, copy=False)


def evaluate_d(params: Dict[str, np.ndarray], P: np.ndarray, delta: np.ndarray, rows: np.ndarray, n_hidden: int,
               temperature: float, chunk: int = 4096, mm: Any = None) -> np.ndarray:
    """score(chosen) - score(rejected) for `rows` (eval mode: no dropout)."""
    out = np.empty(rows.size, dtype=np.float32)
    for a in range(0, rows.size, chunk):
        r = rows[a:a + chunk]
        g = gating_forward(params, P[r] if isinstance(mm, CoreMatmul) else _rows_f32(P, r), n_hidden, temperature,
                           mm=mm)
        out[a:a + chunk] = np.einsum("bk,bk->b", g, delta[r])
    return out


def train_gating(prompts: np.ndarray, delta: np.ndarray, cfg: GatingConfig, *, progress: ProgressArg = False,
                 blas_threads: Optional[int] = None, init: Optional[Dict[str, np.ndarray]] = None,
                 ) -> Tuple[Dict[str, np.ndarray], Dict[str, Any], List[Dict[str, float]]]:
    """Trains the gating network on prompt embeddings [N, H] (float32 or bf16 bits) and
    delta = (r_chosen - r_rejected) T [N, K]; returns (params, report, history)."""
    N, H = prompts.shape
    K = delta.shape[1]
    if delta.shape[0] != N:
        raise ValueError(f"{N} prompt embeddings but {delta.shape[0]} reward rows")
    train_idx, val_idx = train_test_split_indices(N, float(cfg.val_fraction), cfg.split_seed)
    mm = matmul_backend(cfg.backend, blas_threads)
    core = isinstance(mm, CoreMatmul)
    if core and prompts.dtype not in (np.uint16, np.float32):
        prompts = prompts.astype(np.float32)
    rng = np.random.default_rng(cfg.seed)
    params = init if init is not None else init_gating(H, K, cfg, rng)
    opt = AdamW(params, cfg.lr, cfg.betas, cfg.eps, cfg.weight_decay, fused=core,
                num_threads=blas_threads or default_num_threads())
    delta32 = np.ascontiguousarray(delta, dtype=np.float32)
    keep_scale = 1.0 / (1.0 - cfg.dropout) if cfg.dropout > 0 else 1.0
    history: List[Dict[str, float]] = []
    bar = None
    cb = progress if callable(progress) else None
    show = bool(progress) and cb is None
    if show:
        try:
            from tqdm import tqdm
            bar = tqdm(total=cfg.steps, desc="training gating", unit="step", file=sys.stderr, dynamic_ncols=True)
        except ImportError:
            bar = None
    t0 = time.perf_counter()
    loss = float("nan")
    val_acc = float("nan")
    with _blas_limit(blas_threads):
        for step in range(cfg.steps):
            lr = cosine_lr(cfg.lr, step, cfg.steps)
            idx = train_idx[rng.integers(0, train_idx.size, size=cfg.batch_size)]
            x = prompts[idx] if core else _rows_f32(prompts, idx)  # the core reads bf16 bits as they are
            masks = dropout_masks(rng, cfg.batch_size, cfg.hidden_dim, cfg.n_hidden, cfg.dropout)
            loss, grads, _ = bt_loss_and_grad(params, x, delta32[idx], cfg.n_hidden, cfg.temperature, masks,
                                              keep_scale, mm=mm)
            opt.step(params, grads, lr)
            last = step + 1 == cfg.steps
            if (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or last:
                val_acc = pair_accuracy(evaluate_d(params, prompts, delta32, val_idx, cfg.n_hidden, cfg.temperature,
                                                   mm=mm))
                history.append({"step": step + 1, "loss": loss, "val_accuracy": val_acc, "lr": lr})
            if cb is not None:
                cb(step + 1, cfg.steps, loss, val_acc)
            elif bar is not None:
                bar.set_postfix_str(f"loss {loss:.4f} val acc {val_acc * 100:.2f}%", refresh=False)
                bar.update(1)
            elif show and ((step + 1) % 50 == 0 or last):
                print(f"\rtraining gating: step {step + 1}/{cfg.steps} loss {loss:.4f} "
                      f"val acc {val_acc * 100:.2f}%", end="", file=sys.stderr, flush=True)
    if bar is not None:
        bar.close()
    elif show:
        print(file=sys.stderr)
    secs = time.perf_counter() - t0
    uniform = pair_accuracy(delta32[val_idx].sum(axis=1))
    rep = {"steps": cfg.steps, "batch_size": cfg.batch_size, "seconds": secs, "matmul": mm.name,
           "seconds_per_step": secs / max(cfg.steps, 1), "final_loss": loss, "val_accuracy": val_acc,
           "val_accuracy_uniform": uniform, "train_pairs": int(train_idx.size), "val_pairs": int(val_idx.size)}
    return params, rep, history


def _cfg_meta(cfg: GatingConfig) -> Dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.__dict__.items()}


def save_gating(path: Union[str, os.PathLike], params: Dict[str, np.ndarray], transform: np.ndarray,
                cfg: GatingConfig, extra_meta: Optional[Dict[str, str]] = None) -> None:
    tensors = {k: np.asarray(v, dtype=np.float32) for k, v in params.items()}
    tensors["reward_transform_matrix"] = np.asarray(transform, dtype=np.float32)
    meta = {"format": "pt", "gating_temperature": repr(float(cfg.temperature)),
            "gating_hidden_dim": str(cfg.hidden_dim), "gating_n_hidden": str(cfg.n_hidden),
            "num_objectives": str(transform.shape[0]), "training": json.dumps(_cfg_meta(cfg))}
    meta.update(extra_meta or {})
    d = os.path.dirname(os.path.abspath(os.fspath(path)))
    os.makedirs(d, exist_ok=True)
    save_file(tensors, path, metadata=meta)


def load_gating(path: Union[str, os.PathLike]) -> Tuple[Dict[str, np.ndarray], np.ndarray, Dict[str, Any]]:
    """(gating params, reward_transform_matrix, head config {temperature, hidden_dim, n_hidden, num_objectives})."""
    f = SafetensorsFile(path)
    if "reward_transform_matrix" not in f or "gating.logit_scale" not in f:
        raise ValueError(f"{path}: needs 'reward_transform_matrix' and 'gating.*' tensors "
                         "(a train-stage2 output)")
    params = {k: to_float(f.read(k), f.info(k).dtype, np.float32) for k in f.keys() if k.startswith("gating.")}
    n_hidden = int(f.metadata.get("gating_n_hidden", -1))
    layers = sorted(int(k.split(".")[2]) for k in params if k.endswith(".weight"))
    if n_hidden < 0:
        n_hidden = len(layers) - 1
    if layers != list(range(n_hidden + 1)):
        raise ValueError(f"{path}: gating layers {layers} do not match gating_n_hidden={n_hidden}")
    T = to_float(f.read("reward_transform_matrix"), f.info("reward_transform_matrix").dtype, np.float32)
    K = T.shape[0]
    if T.shape != (K, K) or params[f"gating.layers.{n_hidden}.weight"].shape[0] != K:
        raise ValueError(f"{path}: reward_transform_matrix {list(T.shape)} does not match the gating output")
    hcfg = {"temperature": float(f.metadata.get("gating_temperature", 10.0)), "n_hidden": n_hidden,
            "hidden_dim": int(params["gating.layers.0.weight"].shape[0]), "num_objectives": K,
            "input_dim": int(params["gating.layers.0.weight"].shape[1])}
    return params, T, hcfg


def head_scores(rewards: np.ndarray, prompts: np.ndarray, params: Dict[str, np.ndarray], T: np.ndarray,
                temperature: float, n_hidden: int) -> np.ndarray:
    """ArmoRM scores [N, S] from rewards [N, S, K] (E W^T) and prompt embeddings [N, H] shared by the S sides."""
    g = gating_forward(params, prompts.astype(np.float32, copy=False), n_hidden, temperature)
    adj = rewards.astype(np.float64) @ T.astype(np.float64)
    return np.einsum("nk,nsk->ns", g.astype(np.float64), adj)


# =========================================================================== train (both parts)


def train(preference: Any, regression: Union[str, os.PathLike, np.ndarray], output: Optional[Union[str, os.PathLike]] = None,
          *, reference: Any = None, config: Optional[GatingConfig] = None, verbosity_index: int = VERBOSITY_INDEX,
          corr_threshold: float = CORR_THRESHOLD, objectives: Optional[Sequence[str]] = None,
          report: Optional[Union[str, os.PathLike]] = None, blas_threads: Optional[int] = None,
          progress: ProgressArg = False, quiet: bool = True) -> Stage2Result:
    """Debiasing + gating training (see the module docstring); writes the gating file when `output` is given.

    `preference`, `reference`: globs / directories / files of prepare-stage2
    output (the reference set defaults to the preference set). `regression`:
    the train-stage1 file (or a [K, H] array). `verbosity_index=None`: no
    debiasing (T = I).
    """
    cfg = config or GatingConfig()
    if isinstance(regression, np.ndarray):
        W, names = np.asarray(regression, np.float32), None
    else:
        W, names = load_regression(regression)
    K = W.shape[0]
    names = list(objectives) if objectives else names
    if names is None or len(names) != K:
        from ..config import ATTRIBUTES
        names = list(ATTRIBUTES) if K == len(ATTRIBUTES) else [f"objective-{k}" for k in range(K)]
    data = read_pairs(preference, W)
    if data.prompts.shape[0] < 2:
        raise ValueError(f"{data.prompts.shape[0]} pair(s): too few to split into training and validation")
    if reference is None:
        R = data.rewards.reshape(-1, K)
    else:
        R = read_pairs(reference, W, need_prompts=False).rewards.reshape(-1, K)
    if verbosity_index is None:
        lam = np.zeros(K)
        corrs: List[Optional[float]] = [None] * K
        T = np.eye(K)
    else:
        lam, corrs = debias_penalties(R, verbosity_index, corr_threshold)
        T = reward_transform_matrix(lam, verbosity_index)
    delta = (data.rewards[:, 0] - data.rewards[:, 1]) @ T
    params, trep, history = train_gating(data.prompts, delta, cfg, progress=progress, blas_threads=blas_threads)
    rep: Dict[str, Any] = {
        "preference_files": data.files, "reference": "preference" if reference is None else
        resolve_embedding_files(reference), "pairs": int(data.prompts.shape[0]),
        "train_pairs": trep["train_pairs"], "val_pairs": trep["val_pairs"],
        "verbosity_index": verbosity_index, "corr_threshold": corr_threshold,
        "penalties": [{"objective": names[k], "lambda": float(lam[k]), "spearman": corrs[k]} for k in range(K)],
        "val_accuracy": trep["val_accuracy"], "val_accuracy_uniform": trep["val_accuracy_uniform"],
        "prompt_embedding_max_abs_diff": data.prompt_mismatch,
        "training": dict(trep, config=_cfg_meta(cfg)), "history": history,
    }
    res = Stage2Result(params, T, lam, rep, history=history)
    if output is not None:
        output = os.fspath(output)
        save_gating(output, params, T, cfg, {"objectives": json.dumps(names),
                                             "penalties": json.dumps([float(x) for x in lam])})
        res.output = output
        report = report if report is not None else os.path.splitext(output)[0] + ".json"
    if report is not None:
        _write_json_atomic(os.fspath(report), rep)
    if not quiet:
        print(res.table())
    return res
