"""ArmoRM training, stage 1: embeddings, then multi-objective ridge regression.

`prepare(model, dataset, output)` -- the reference's `stage-1_prepare.py`:
each conversation (`messages`) is formatted with the model's chat template
(one BOS: the Llama-3 template writes `<|begin_of_text|>` itself and is
tokenized without special tokens; a doubled BOS is an error), run through the
frozen backbone in packed batches (no padding), and the final hidden state of
its last token kept. Output, as the reference writes it:
`<output>/<name>-<shard:05d>-of-<n_shards:05d>.safetensors` holding
`embeddings` [N, H] (bfloat16 by default, as the reference, whose bf16 model
returns bf16 hidden states; float32 on request) and `labels` [N, K] float32
with NaN for a missing label. `<name>` defaults to the dataset's last path
component (the reference uses the dataset path's last component).

Shuffling, sharding, resumable chunks and the atomic final write are the
preparation loop's, shared with stage 2 (`armorm.train.prepare`).

`train(files, output)` -- the reference's `stage-1_train.py`, done the
efficient way, with the same result as a float64 solve of the reference's
procedure:

- rows = the files sorted by path and concatenated (as the reference's
  `sorted(glob(...))`); split 80/20 exactly as scikit-learn's
  `train_test_split(test_size=0.2, random_state=42)` (a `RandomState(42)`
  permutation; the first ceil(0.2 N) rows of it validate), reproduced here
  without scikit-learn;
- per objective: rows with a label (not NaN); ridge without intercept,
  `(X^T X + alpha I) w = X^T y`, for every alpha of the grid; the alpha with
  the lowest validation MSE wins (ties: the smaller alpha, as the reference's
  `idxmin`); its training-row solution is the weight row (the reference's
  final refit on the same rows with the same alpha gives the same vector).
- Objectives whose label masks are identical (one source labels several
  objectives) share one accumulation of X^T X, streamed over the files in
  row chunks (the reference recomputes X^T X for every objective and
  alpha). A mask with fewer training rows than H is solved in the dual
  (kernel) form on the n x n ridge.Gram matrix. Validation MSE is computed from
  predictions on the validation rows (kept in their stored dtype meanwhile).
- X^T X: float64 (exact), or for bf16 embeddings on a CPU with AVX512_BF16
  (`gram="auto"`) the core's bf16 GEMM (exact products, float32 sums per
  block of 4096 rows, float64 across blocks; about 1e-6 relative error).
  Solutions from the bf16 X^T X are then corrected against the exact rows:
  each pass over the files computes the float64 residual
  X^T (y - X w) - alpha w and solves for the correction, until the estimated
  remaining relative error is below 1e-9 (one or two passes, measured); a
  mask where that is slow is accumulated again in float64.
- Solves (`solver="mixed"`, the default with scipy): float32 Cholesky
  factorizations refined in float64 against X^T X to float64 solutions; the
  smallest alpha's factor also serves every alpha where that refinement
  converges fast (alphas well below X^T X's smallest eigenvalue), the
  others get their own; a float64 factor where float32 is too coarse for
  the conditioning, the eigendecomposition where even that fails. The
  masks' solves run on all cores (LAPACK through ctypes releases the GIL).

`train` runs in named steps: `_read_labels`, `_group_masks`, then `_Fit`'s
accumulate, solve, refine and validate, `_choose_alphas`, `_report`; the
linear algebra (Gram accumulation, the solvers, the thread pool) is
`armorm.train.ridge`'s.

Objectives without training or validation labels: a ValueError naming them,
or with `skip_unlabeled=True` a zero weight row that the report marks
`"skipped"` with the reason, plus a warning -- never a silent zero row.
"""
from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..atomic import write_json_atomic
from ..config import ATTRIBUTES
from ..data import DatasetError
from ..progress import Progress, ProgressArg
from ..safetensors_io import DTYPES, SafetensorsFile, save_file, to_float
from . import prepare as prep
from . import ridge

#: The reference's alpha grid.
DEFAULT_ALPHAS: List[float] = [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4]
#: Exact refinement of bf16-gram solutions stops when the estimated relative error (per column) is below this.
_REFINE_TOL = 1e-9
FORMAT_VERSION = 1
_META_KEY = "armorm_stage1"



def train_test_split_indices(n: int, test_size: float = 0.2, seed: int = 42) -> Tuple[np.ndarray, np.ndarray]:
    """(train, test) row indices exactly as scikit-learn's `train_test_split(test_size, random_state=seed)`.

    ShuffleSplit: `RandomState(seed).permutation(n)`; the first
    `ceil(test_size * n)` entries are the test rows, the rest train.
    """
    if not isinstance(test_size, float) or not 0.0 < test_size < 1.0:
        raise ValueError(f"the validation fraction must be a float in (0, 1), got {test_size!r}")
    n_test = math.ceil(test_size * n)
    n_train = n - n_test
    if n_train <= 0 or n_test <= 0:
        raise ValueError(f"cannot split {n} rows with a validation fraction of {test_size}: "
                         f"{n_train} training and {n_test} validation rows")
    perm = np.random.RandomState(seed).permutation(n)
    return perm[n_test:], perm[:n_test]


# =========================================================================== prepare


def _resolve_objectives(objectives: Optional[Sequence[str]]) -> List[str]:
    if objectives is None:
        return list(ATTRIBUTES)
    if isinstance(objectives, str):
        objectives = [objectives]
    names: List[str] = []
    for o in objectives:
        names.extend(p.strip() for p in str(o).split(",") if p.strip())
    if not names:
        raise ValueError("no objectives given")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"objectives listed twice: {', '.join(dup)}")
    return names


def _messages(rec: Dict[str, Any], where: str) -> List[Dict[str, Any]]:
    if "messages" not in rec:
        keys = ", ".join(sorted(map(str, rec))) or "none"
        raise DatasetError(f"{where}: has no 'messages' (its keys: {keys})")
    msgs = rec["messages"]
    if not isinstance(msgs, (list, tuple)) or not msgs:
        raise DatasetError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} dicts")
    out = []
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DatasetError(f"{where}: message {j} must be a dict with string 'role' and 'content'")
        out.append(m)
    return out


def _label(value: Any, name: str, where: str) -> float:
    if value is None:
        return math.nan
    if isinstance(value, (bool, np.bool_)):
        return float(value)
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, str):
        v = float(value)
        if math.isinf(v):
            raise DatasetError(f"{where}: objective {name!r} has an infinite label ({value!r})")
        return v
    raise DatasetError(f"{where}: objective {name!r} has a label that is not a number: {value!r} "
                       f"({type(value).__name__}); use a number, or null for a missing label")


class Stage1Kind(prep.Kind):
    """Stage 1's preparation: each row's `messages` -> the last token's final hidden state, plus its labels."""

    title, command, meta_key, version = "stage 1", "prepare-stage1", _META_KEY, FORMAT_VERSION
    missing_hint = "set the objectives to the label columns"

    def __init__(self, objectives: Optional[Sequence[str]]) -> None:
        self.objectives = _resolve_objectives(objectives)
        self.columns = self.required = ["messages", *self.objectives]

    def settings(self) -> Dict[str, Any]:
        return {"objectives": self.objectives}

    def parse(self, records: List[Dict[str, Any]], wheres: List[str]) -> Any:
        labels = np.empty((len(records), len(self.objectives)), dtype=np.float32)
        convs = []
        for j, (rec, where) in enumerate(zip(records, wheres)):
            convs.append(_messages(rec, where))
            for k, o in enumerate(self.objectives):
                labels[j, k] = _label(rec.get(o), o, where)
        return convs, labels, wheres

    def embed(self, model: Any, work: Any, rows: np.ndarray, batch_tokens: int, report: prep.Report) -> prep.Chunk:
        convs, labels, wheres = work
        seqs = prep.tokenize(model.tokenizer, convs, wheres)
        prep.check_lengths(model, seqs, wheres)
        hidden = prep.embed_sequences(model, seqs, ["hidden_state"], batch_tokens, report)["hidden_state"]
        return prep.Chunk({"embeddings": hidden, "labels": labels},
                          {"tokens": str(int(sum(s.size for s in seqs)))})

    def assemble(self, chunks: List[SafetensorsFile], final: str, metadata: Dict[str, str], st_dtype: str,
                 rows: int) -> List[str]:
        K = len(self.objectives)
        notes: List[str] = []
        H = chunks[0].info("embeddings").shape[1]
        for f in chunks:
            if f.info("embeddings").shape[1:] != (H,) or f.info("embeddings").dtype != st_dtype:
                raise ValueError(f"{f.path}: chunk does not match the others; pass restart=True to redo the shard")
        labels_all = np.concatenate([f.read("labels") for f in chunks], axis=0)
        for k in np.flatnonzero(np.isnan(labels_all).all(axis=0)):
            msg = (f"objective {self.objectives[int(k)]!r} has no label in any of the {rows} rows of this shard "
                   "(check the objective names)")
            warnings.warn(msg, stacklevel=4)
            notes.append(f"warning: {msg}")
        save_file({"embeddings": (st_dtype, (rows, H), (f.read("embeddings") for f in chunks)),
                   "labels": ("F32", (rows, K), (f.read("labels") for f in chunks))},
                  final, metadata=dict(metadata, objectives=json.dumps(self.objectives)))
        name = "bfloat16" if st_dtype == "BF16" else "float32"
        return notes + [f"wrote {rows} embeddings [{rows}, {H}] {name} and labels [{rows}, {K}] to {final}"]


def prepare(model: Any, dataset: Any, output: Union[str, os.PathLike], *, n_shards: int = 1, shard_idx: int = 1,
            split: str = "train", name: Optional[str] = None, objectives: Optional[Sequence[str]] = None,
            batch_tokens: int = 8192, embeddings_dtype: str = "bfloat16", torch_dtype: str = "bfloat16",
            seed: Optional[int] = 0, shard_mode: str = "contiguous", chunk_rows: int = 1024,
            num_threads: Optional[int] = None, progress: ProgressArg = None, overwrite: bool = False,
            restart: bool = False, quiet: bool = False, check_finite: bool = True) -> str:
    """Writes one shard of stage-1 embeddings and labels; returns the file's path.

    `model`: a model directory / hub id (its backbone is loaded, weights held
    in `torch_dtype`, bfloat16 as the reference) or a loaded `ArmoRM`.
    `dataset`: see `armorm.data.open_dataset` (JSONL, Parquet, `datasets`
    directory or hub id); each row needs `messages` and may have a number
    or null for each of `objectives` (default: the 19 ArmoRM attributes; a
    JSONL row may also omit a key, which counts as missing).
    `embeddings_dtype`: "bfloat16" (the reference's) or "float32".
    `progress`: None (a bar when stderr is a terminal), True/False, or a
    callable `(rows_done, rows_total, tokens_done)` called after each packed
    batch. `overwrite`: replace an existing output made with other settings
    (an existing output with the same settings is returned as is).
    `restart`: discard the partial work of an interrupted run. Shuffling,
    sharding, chunks and resuming: `armorm.train.prepare`.
    """
    return prep.run(Stage1Kind(objectives), model, dataset, output, n_shards=n_shards, shard_idx=shard_idx,
                    split=split, name=name, batch_tokens=batch_tokens, embeddings_dtype=embeddings_dtype,
                    torch_dtype=torch_dtype, seed=seed, shard_mode=shard_mode, chunk_rows=chunk_rows,
                    num_threads=num_threads, progress=progress, overwrite=overwrite, restart=restart, quiet=quiet,
                    check_finite=check_finite)


# =========================================================================== train


@dataclass
class Stage1Result:
    """What `train` returns: the [K, H] weight, the objective names and the report."""

    weight: np.ndarray
    objectives: List[str]
    report: Dict[str, Any]
    output: Optional[str] = None
    report_path: Optional[str] = None

    def table(self) -> str:
        return format_report_table(self.report)


def format_report_table(report: Dict[str, Any]) -> str:
    rows = report["objectives"]
    w = max([len("objective")] + [len(r["objective"]) for r in rows])
    lines = [f"{'objective':<{w}}  {'alpha':>7}  {'val MSE':>10}  {'train':>8}  {'val':>7}  form",
             f"{'-' * w}  {'-' * 7}  {'-' * 10}  {'-' * 8}  {'-' * 7}  {'-' * 6}"]
    for r in rows:
        if r.get("skipped"):
            lines.append(f"{r['objective']:<{w}}  {'-':>7}  {'-':>10}  {r['train_count']:>8,}  {r['val_count']:>7,}  "
                         f"skipped: {r['reason']}")
        else:
            lines.append(f"{r['objective']:<{w}}  {r['alpha']:>7.0e}  {r['val_mse']:>10.6f}  {r['train_count']:>8,}  "
                         f"{r['val_count']:>7,}  {r['form']}")
    lines.append(f"{report['rows']:,} rows ({report['train_rows']:,} train / {report['val_rows']:,} validation), "
                 f"hidden size {report['hidden_size']}, {len(report['files'])} file(s), "
                 f"{report['timings_s']['total']:.1f} s")
    return "\n".join(lines)


@dataclass
class _Group:
    objectives: List[int]
    train_rows: np.ndarray            # sorted global row indices
    val_rows: np.ndarray
    form: str = "primal"
    A: Optional[np.ndarray] = None    # primal: X^T X ; dual: the training rows X (n x H)
    B: Optional[np.ndarray] = None    # primal: X^T Y
    Ytr: Optional[np.ndarray] = None  # [n_train, k] float64
    mse: Optional[np.ndarray] = None  # [n_alpha, k]
    W: Optional[List[np.ndarray]] = None  # per alpha [H, k]
    gram: str = "float64"             # how A was accumulated: "float64" (exact) or "bf16"
    solver: Optional["ridge.MixedSolver"] = None  # kept for the corrections of a bf16-gram solution
    changes: List[float] = field(default_factory=list)  # relative size of each exact pass's correction
    est_error: float = math.nan       # estimated relative error left after the last pass
    fallback: bool = False            # the bf16 gram was replaced by a float64 one


def _first_nonfinite_row(raw: np.ndarray, st_dtype: str) -> int:
    """Index of the first row holding a NaN or infinity (stored values), or -1."""
    if st_dtype == "BF16":
        if raw.size == 0 or int(np.max(raw & np.uint16(0x7FFF))) < 0x7F80:  # exponent all ones: inf/NaN
            return -1
        bad = (raw & np.uint16(0x7F80)) == np.uint16(0x7F80)
    else:
        if np.isfinite(raw).all():
            return -1
        bad = ~np.isfinite(raw)
    return int(np.flatnonzero(bad.any(axis=1))[0])


def _stream(files: List[SafetensorsFile], offsets: np.ndarray, chunk_rows: int, row_sets: Sequence[np.ndarray],
            bar: Optional[Progress] = None, check: bool = False,
            scratch: Optional[ridge.Scratch] = None) -> Iterator[Tuple[str, np.ndarray, int, List[Tuple[int, int]]]]:
    """Reads the chunks of `chunk_rows` rows that hold a row of some set (sorted global row indices).

    Yields (stored dtype, raw embedding rows, global index of the chunk's
    first row, [(lo, hi)] per set: that set's rows in the chunk are
    `rows[lo:hi]`; the raw rows are only valid until the next chunk). `check`:
    a ValueError names a row with a NaN/infinity.
    """
    bufs: Dict[str, np.ndarray] = {}
    try:
        for fi, f in enumerate(files):
            e = f.info("embeddings")
            for a in range(0, e.shape[0], chunk_rows):
                b = min(e.shape[0], a + chunk_rows)
                ga, gb = int(offsets[fi] + a), int(offsets[fi] + b)
                spans = [(int(lo), int(hi)) for lo, hi in (np.searchsorted(rows, [ga, gb]) for rows in row_sets)]
                if any(hi > lo for lo, hi in spans):
                    if e.dtype not in bufs:
                        shape = (chunk_rows,) + tuple(e.shape[1:])
                        bufs[e.dtype] = scratch.get(shape, DTYPES[e.dtype]) if scratch else np.empty(shape, DTYPES[e.dtype])
                    raw = f.read("embeddings", a, b, out=bufs[e.dtype][:b - a])
                    if check:
                        bad = _first_nonfinite_row(raw, e.dtype)
                        if bad >= 0:
                            raise ValueError(f"{f.path}: row {a + bad}: the embedding has a NaN or infinite value")
                    yield e.dtype, raw, ga, spans
                if bar is not None:
                    bar.update(b - a, 0)
    finally:
        if scratch is not None:
            for buf in bufs.values():
                scratch.put(buf)


def _exact_residuals(files: List[SafetensorsFile], offsets: np.ndarray, chunk_rows: int, groups: List["_Group"],
                     alphas: Sequence[float], pool: Optional[Any], scratch: ridge.Scratch,
                     block: int = 512) -> List[List[np.ndarray]]:
    """Per group, per alpha: X^T (Y - X W) - alpha W over the group's training rows, in float64.

    One pass over the files: the exact residuals of the current solutions
    (`g.W`), whatever approximation of X^T X produced them. Rows are decoded
    `block` at a time, so both products read them from cache.
    """
    na = len(alphas)
    W_all = [np.concatenate(g.W, axis=1) for g in groups]
    acc = [np.zeros_like(w) for w in W_all]

    def one(t: Tuple[int, str, np.ndarray, int, int, int]) -> None:
        gi, st, raw, ga, lo, hi = t
        g = groups[gi]
        X = scratch.get((block, raw.shape[1]), np.float64)
        for a in range(lo, hi, block):
            b = min(hi, a + block)
            Xb = X[:b - a]
            ridge.decode_into(raw[g.train_rows[a:b] - ga], st, Xb)
            U = np.tile(g.Ytr[a:b], (1, na))
            U -= Xb @ W_all[gi]
            acc[gi] += Xb.T @ U
        scratch.put(X)

    for st, raw, ga, spans in _stream(files, offsets, chunk_rows, [g.train_rows for g in groups], scratch=scratch):
        # one task per group and chunk: a group's sum is only ever updated by one thread at a time
        ridge.pool_map(pool, one, [(gi, st, raw, ga, lo, hi) for gi, (lo, hi) in enumerate(spans) if hi > lo])
    k = [len(g.objectives) for g in groups]
    return [[acc[gi][:, i * k[gi]:(i + 1) * k[gi]] - a * g.W[i] for i, a in enumerate(alphas)]
            for gi, g in enumerate(groups)]


def _objective_names(files: List[SafetensorsFile], K: int, objectives: Optional[Sequence[str]]) -> List[str]:
    if objectives is not None:
        names = _resolve_objectives(objectives)
        if len(names) != K:
            raise ValueError(f"{len(names)} objective names given, but the labels have {K} columns")
        return names
    for f in files:
        raw = f.metadata.get("objectives")
        if raw:
            try:
                names = json.loads(raw)
            except ValueError:
                continue
            if isinstance(names, list) and len(names) == K and all(isinstance(n, str) for n in names):
                return names
    return list(ATTRIBUTES) if K == len(ATTRIBUTES) else [f"objective-{k}" for k in range(K)]


@dataclass
class _Labels:
    """What `_read_labels` finds in the files: shapes, the stored embedding dtype, every label."""

    H: int
    K: int
    emb_dtype: str       # stored dtype of the rows (files of mixed dtypes: "F32" or "F64")
    Y: np.ndarray        # [N, K] float32, NaN = no label
    offsets: np.ndarray  # [n_files + 1] global index of each file's first row


def _read_labels(files: List[SafetensorsFile]) -> _Labels:
    """Step 1: checks every file's shapes and dtypes and reads all labels (the embeddings stay on disk)."""
    H = K = None
    counts, label_parts = [], []
    emb_dtype = None
    for f in files:
        e, lab = f.info("embeddings"), f.info("labels")
        if len(e.shape) != 2 or len(lab.shape) != 2:
            raise ValueError(f"{f.path}: embeddings must be [N, H] and labels [N, K], got "
                             f"{list(e.shape)} and {list(lab.shape)}")
        if e.shape[0] != lab.shape[0]:
            raise ValueError(f"{f.path}: {e.shape[0]} embeddings but {lab.shape[0]} label rows; "
                             "the counts must match")
        if e.dtype not in ("BF16", "F16", "F32", "F64") or lab.dtype not in ("BF16", "F16", "F32", "F64"):
            raise ValueError(f"{f.path}: embeddings and labels must be floating point "
                             f"(got {e.dtype} and {lab.dtype})")
        if H is None:
            H, K, emb_dtype = e.shape[1], lab.shape[1], e.dtype
        elif (e.shape[1], lab.shape[1]) != (H, K):
            raise ValueError(f"{f.path}: shape [{e.shape[0]}, {e.shape[1]}] / [{lab.shape[0]}, {lab.shape[1]}] "
                             f"does not match the first file's hidden size {H} / {K} objectives")
        if e.dtype != emb_dtype:
            emb_dtype = "F32" if "F64" not in (e.dtype, emb_dtype) else "F64"  # mixed: keep rows as float
        y = f.read("labels", dtype=np.float32)
        bad = np.isinf(y)
        if bad.any():
            r, k = np.argwhere(bad)[0]
            raise ValueError(f"{f.path}: row {r}, objective column {k}: infinite label")
        counts.append(e.shape[0])
        label_parts.append(y)
    assert H is not None and K is not None and emb_dtype is not None
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return _Labels(int(H), int(K), emb_dtype, np.concatenate(label_parts, axis=0), offsets)


@dataclass
class _Masks:
    """What `_group_masks` decides: the split, the groups of objectives sharing a label mask, the report rows."""

    test_idx: np.ndarray
    groups: List[_Group]
    val_rows: np.ndarray                 # every group's validation rows, sorted, unique
    entries: List[Dict[str, Any]]        # the report's row per objective
    warnings: List[str]


def _group_masks(lab: _Labels, names: List[str], val_fraction: float, seed: int, form: str,
                 skip_unlabeled: bool) -> _Masks:
    """Step 2: the 80/20 split, objectives grouped by identical label masks, primal or dual form each.

    Objectives without training or validation labels fail (or, with
    `skip_unlabeled`, get a zero row and a warning).
    """
    N = lab.Y.shape[0]
    _, test_idx = train_test_split_indices(N, float(val_fraction), seed)
    is_val = np.zeros(N, dtype=bool)
    is_val[test_idx] = True
    mask = ~np.isnan(lab.Y)
    entries: List[Dict[str, Any]] = []
    problems: List[str] = []
    notes: List[str] = []
    by_mask: Dict[bytes, List[int]] = {}
    for k in range(lab.K):
        m = mask[:, k]
        n_tr = int((m & ~is_val).sum())
        n_va = int((m & is_val).sum())
        entries.append({"index": k, "objective": names[k], "train_count": n_tr, "val_count": n_va})
        reason = None
        if n_tr + n_va == 0:
            reason = "no labels at all"
        elif n_tr == 0:
            reason = "no labels among the training rows"
        elif n_va == 0:
            reason = "no labels among the validation rows"
        if reason:
            problems.append(f"{names[k]} ({reason})")
            entries[k].update(skipped=True, reason=reason)
            continue
        by_mask.setdefault(np.packbits(m).tobytes(), []).append(k)
    if problems:
        if not skip_unlabeled:
            raise ValueError("cannot fit objective(s) " + "; ".join(problems) +
                             ": check the objective names and the data, or pass skip_unlabeled=True "
                             "(--skip-unlabeled) to write zero rows for them, marked in the report")
        for p in problems:
            msg = f"objective {p}: skipped, its weight row is zero"
            notes.append(msg)
            warnings.warn(msg, stacklevel=3)
    groups: List[_Group] = []
    for ks in by_mask.values():
        m = mask[:, ks[0]]
        g = _Group(ks, np.flatnonzero(m & ~is_val), np.flatnonzero(m & is_val))
        g.form = form if form != "auto" else ("dual" if g.train_rows.size < lab.H else "primal")
        if g.form == "dual" and g.train_rows.size > 32768:
            raise ValueError(f"form='dual' would build a {g.train_rows.size} x {g.train_rows.size} kernel matrix "
                             f"for {', '.join(names[k] for k in ks)}; use form='auto' (primal when rows >= H)")
        g.Ytr = lab.Y[g.train_rows][:, ks].astype(np.float64)
        groups.append(g)
    val_rows = np.unique(np.concatenate([g.val_rows for g in groups])) if groups else np.zeros(0, np.int64)
    return _Masks(test_idx, groups, val_rows, entries, notes)


class _Fit:
    """Steps 3-6 on the groups: accumulate, solve, refine, validate, sharing the files, pool and buffers."""

    def __init__(self, files: List[SafetensorsFile], lab: _Labels, masks: _Masks, alphas: List[float],
                 solver: str, chunk_rows: int, progress: ProgressArg) -> None:
        self.files, self.lab, self.masks, self.alphas = files, lab, masks, alphas
        self.solver, self.chunk_rows, self.progress = solver, chunk_rows, progress
        self.scratch = ridge.Scratch()  # factors and row buffers, reused
        self.notes: Dict[str, int] = {}  # what the solves did, summed
        stored = DTYPES[lab.emb_dtype]
        self.V = np.empty((masks.val_rows.size, lab.H), dtype=stored)  # validation rows, as stored
        self.pool: Optional[Any] = None
        self.threads = self.solve_threads = 1

    def use_pool(self, pool: Optional[Any], max_workers: Optional[int]) -> None:
        self.pool = pool
        self.threads = ridge.pool_size(max_workers)  # the core's GEMM threads
        self.solve_threads = self.threads if pool is not None else 1  # factorizations at once (1-thread BLAS each)

    def release(self, g: _Group) -> None:
        if g.solver is not None:
            g.solver.release()
        g.A = g.B = g.solver = None

    def accumulate(self, sel: List[_Group], mode: str, first: bool) -> None:
        """Step 3, one streaming pass: X^T X and X^T Y of `sel`'s primal groups ("float64" exact, or "bf16"
        on the core's GEMM), rows of its dual groups and (`first`) the validation rows."""
        H, emb_dtype, scratch = self.lab.H, self.lab.emb_dtype, self.scratch
        val_rows = self.masks.val_rows
        work = scratch.get((H, H), np.float32) if mode == "bf16" else scratch.get((4096, H), np.float64)
        grams = [ridge.Gram(H, len(g.objectives), g.train_rows.size, mode, emb_dtype, self.pool, self.threads, work,
                            scratch) if g.form == "primal" else None for g in sel]
        for g in sel:
            if g.form == "dual":
                g.A = np.empty((g.train_rows.size, H), dtype=np.float64)
        show = self.progress if self.progress is not None and first else False
        with Progress(self.lab.Y.shape[0], show=show, desc="accumulating X^T X", unit="row") as bar:
            sets = [g.train_rows for g in sel] + ([val_rows] if first else [])
            for st, raw, ga, spans in _stream(self.files, self.lab.offsets, self.chunk_rows, sets, bar, first,
                                              scratch):
                for g, gr, (lo, hi) in zip(sel, grams, spans):
                    if hi > lo:
                        rows = raw[g.train_rows[lo:hi] - ga]
                        if gr is None:
                            ridge.decode_into(rows, st, g.A[lo:hi])
                        else:
                            gr.add(rows, st, g.Ytr[lo:hi])
                if first and spans[-1][1] > spans[-1][0]:
                    vlo, vhi = spans[-1]
                    rows_v = raw[val_rows[vlo:vhi] - ga]
                    self.V[vlo:vhi] = rows_v if st == emb_dtype else to_float(rows_v, st, self.V.dtype)
        for g, gr in zip(sel, grams):
            g.gram = "float64" if gr is None else mode
            if gr is not None:
                g.A, g.B = gr.finish()
        scratch.put(work)

    def solve(self, sel: List[_Group]) -> None:
        """Step 4: every alpha's solution for `sel`: primal (X^T X + a I) W = X^T Y; dual (X X^T + a I) C = Y,
        W = X^T C."""
        def system(g: _Group) -> Tuple[np.ndarray, np.ndarray]:
            return (g.A, g.B) if g.form == "primal" else (g.A @ g.A.T, g.Ytr)

        alphas = self.alphas
        per_alpha = self.solver in ("cholesky", "lu")  # one factorization per alpha: independent tasks
        tasks = [(i, [a]) for i in range(len(sel)) for a in alphas] if per_alpha else \
            [(i, alphas) for i in range(len(sel))]
        solved = ridge.pool_map(self.pool, lambda t: ridge.solve_all_alphas(*system(sel[t[0]]), t[1], self.solver,
                                                                           self.solve_threads, self.scratch), tasks)
        for _, info, _ in solved:
            for key, v in info.items():
                self.notes[key] = self.notes.get(key, 0) + v
        for i, g in enumerate(sel):
            W = [w for (j, _), (ws, _, _) in zip(tasks, solved) if j == i for w in ws]
            g.W = W if g.form == "primal" else [g.A.T @ c for c in W]
            g.solver = next((ms for (j, _), (_, _, ms) in zip(tasks, solved) if j == i), None)
            if g.gram != "bf16":
                self.release(g)  # only bf16-gram solutions get corrected

    def refine(self) -> None:
        """Step 5, bf16 X^T X only: corrects the solutions against the exact rows (float64 residuals).

        W += (X~^T X~ + a I)^-1 (X^T (Y - X W) - a W), one pass over the files
        each: the error shrinks by about the relative error that X~^T X~
        caused. Done when the estimated remaining change is below _REFINE_TOL;
        a mask whose corrections do not shrink fast is accumulated again in
        float64.
        """
        pending = [g for g in self.masks.groups if g.gram == "bf16"]
        while pending:
            residuals = _exact_residuals(self.files, self.lab.offsets, self.chunk_rows, pending, self.alphas,
                                         self.pool, self.scratch)

            def correct(t: Tuple[_Group, List[np.ndarray]]) -> Optional[List[np.ndarray]]:
                if t[0].solver is None:  # solved by the eigendecomposition: no factors to correct with
                    return None
                try:
                    return t[0].solver.solve(t[1], tol=1e-6)
                except np.linalg.LinAlgError:
                    return None

            again, redo = [], []
            for g, D in zip(pending, ridge.pool_map(self.pool, correct, list(zip(pending, residuals)))):
                if D is None:
                    redo.append(g)
                    continue
                g.W = [w + d for w, d in zip(g.W, D)]
                g.changes.append(max(ridge.col_change(d, w) for w, d in zip(g.W, D)))
                c = g.changes
                rate = c[-1] / c[-2] if len(c) > 1 and c[-2] > 0 else math.nan
                # after the first pass the contraction is estimated by the first correction itself (the
                # relative error X~^T X~ caused), with a margin of 10
                est = 10 * c[0] * c[0] if len(c) == 1 else (c[-1] * rate / (1 - rate) if rate < 0.5 else math.inf)
                if c[-1] == 0 or est <= _REFINE_TOL:
                    g.est_error = est
                elif c[0] > 1e-2 or rate > 0.1 or len(c) >= 4:
                    redo.append(g)
                else:
                    again.append(g)
            for g in pending:
                if g not in again:
                    self.release(g)
            if redo:  # too far from float64 for refinement: X^T X again, exactly
                for g in redo:
                    g.fallback = True
                self.accumulate(redo, "float64", first=False)
                self.solve(redo)
            pending = again

    def validate(self) -> None:
        """Step 6: every alpha's validation MSE per objective, from the validation rows kept as stored."""
        H, chunk_rows, na = self.lab.H, self.chunk_rows, len(self.alphas)
        for g in self.masks.groups:
            W_all = np.concatenate(g.W, axis=1)  # [H, n_alpha * k]
            Yv = self.lab.Y[g.val_rows][:, g.objectives].astype(np.float64)
            sse = np.zeros(W_all.shape[1])
            pos = np.searchsorted(self.masks.val_rows, g.val_rows)
            Xv = self.scratch.get((chunk_rows, H), np.float64)
            for s in range(0, pos.size, chunk_rows):
                n = min(chunk_rows, pos.size - s)
                ridge.decode_into(self.V[pos[s:s + n]], self.lab.emb_dtype, Xv[:n])
                R = Xv[:n] @ W_all - np.tile(Yv[s:s + n], (1, na))
                sse += np.einsum("ij,ij->j", R, R)
            g.mse = (sse / g.val_rows.size).reshape(na, len(g.objectives))
            self.scratch.put(Xv)
        self.scratch = ridge.Scratch()  # the buffers are free


def _choose_alphas(masks: _Masks, alphas: List[float], names: List[str], H: int) -> np.ndarray:
    """The [K, H] weight: per objective the alpha of the lowest validation MSE (first on ties, as pandas'
    idxmin); its entry in the report gets the alpha, the MSEs and the form."""
    weight = np.zeros((len(masks.entries), H), dtype=np.float32)
    for gi, g in enumerate(masks.groups):
        for j, k in enumerate(g.objectives):
            col = np.where(np.isnan(g.mse[:, j]), np.inf, g.mse[:, j])
            if not np.isfinite(col).any():
                raise ValueError(f"objective {names[k]}: every alpha gave a non-finite validation MSE")
            best = int(np.argmin(col))
            weight[k] = g.W[best][:, j].astype(np.float32)
            masks.entries[k].update(alpha=alphas[best], val_mse=float(g.mse[best, j]), form=g.form, group=gi,
                                    val_mse_by_alpha=[float(v) for v in g.mse[:, j]])
    return weight


def _report(paths: List[str], lab: _Labels, masks: _Masks, fit: _Fit, names: List[str], val_fraction: float,
            seed: int, solver_used: str, timings: Dict[str, float]) -> Dict[str, Any]:
    """Step 7: the JSON report (per objective, per group, timings)."""
    N, n_val = int(lab.Y.shape[0]), int(masks.test_idx.size)
    notes = fit.notes
    return {
        "files": paths, "rows": N, "train_rows": N - n_val, "val_rows": n_val,
        "hidden_size": int(lab.H), "alphas": fit.alphas, "val_fraction": float(val_fraction), "seed": seed,
        "solver": "+".join(sorted(k for k in notes if " " not in k)) or solver_used,
        "solver_work": {k: v for k, v in notes.items() if " " in k},
        "groups": [{"objectives": [names[k] for k in g.objectives], "form": g.form,
                    "train_count": int(g.train_rows.size), "val_count": int(g.val_rows.size),
                    "gram": "bf16, refined" if g.changes and not g.fallback else
                    "float64 (bf16 refinement too slow)" if g.fallback else "float64",
                    **({"exact_passes": len(g.changes), "corrections": g.changes,
                        "estimated_rel_error": g.est_error} if g.changes and not g.fallback else {})}
                   for g in masks.groups],
        "objectives": masks.entries, "warnings": masks.warnings, "timings_s": timings,
    }


def train(embeddings: Any, output: Optional[Union[str, os.PathLike]] = None, *,
          report: Optional[Union[str, os.PathLike]] = None, alphas: Sequence[float] = DEFAULT_ALPHAS,
          val_fraction: float = 0.2, seed: int = 42, objectives: Optional[Sequence[str]] = None,
          solver: str = "auto", form: str = "auto", gram: str = "auto", skip_unlabeled: bool = False,
          chunk_rows: int = 4096, max_workers: Optional[int] = None, progress: ProgressArg = False,
          quiet: bool = True) -> Stage1Result:
    """Fits the [K, H] regression layer from stage-1 files (see the module docstring).

    `embeddings`: a glob, directory, file or list of them (sorted by path).
    `output`: where to write `regression_layer.weight` (safetensors, float32);
    `report` (default: `output` with a .json suffix) gets the JSON report.
    `solver`: "auto" ("mixed" when scipy is installed, else "cholesky"),
    "mixed" (float32 Cholesky factorizations, shared between alphas where
    that converges fast, refined in float64 to float64 solutions),
    "cholesky" (one float64 factorization per alpha), "eigh" (one
    eigendecomposition per label mask) or "lu". `form`: "auto" (dual when a
    mask has fewer training rows than H), "primal" or "dual". `gram`: how
    X^T X is accumulated: "float64" (exact), "bf16" (bf16 embeddings, the
    core's AVX512_BF16 GEMM, then the solutions refined against the exact rows
    in float64 passes; needs solver "mixed") or "auto" (bf16 where it can).
    `skip_unlabeled`: an objective without training or validation labels
    gets a zero row marked in the report instead of an error.
    `max_workers`: threads for the X^T X products and the solves (default:
    the usable CPUs, at most 8), each with a one-thread BLAS; they run in
    parallel only when the optional `threadpoolctl` is installed.
    """
    t = [time.perf_counter()]
    alphas = [float(a) for a in alphas]
    if not alphas or any(not (a > 0 and math.isfinite(a)) for a in alphas):
        raise ValueError(f"alphas must be positive finite numbers, got {alphas}")
    if solver not in ("auto", "mixed", "cholesky", "eigh", "lu"):
        raise ValueError(f"solver must be auto, mixed, cholesky, eigh or lu, got {solver!r}")
    if solver == "mixed" and ridge.scipy_lapack() is None:
        raise ValueError("solver='mixed' needs scipy (its LAPACK wrappers); install scipy or use 'cholesky'")
    if form not in ("auto", "primal", "dual"):
        raise ValueError(f"form must be auto, primal or dual, got {form!r}")
    if gram not in ("auto", "bf16", "float64"):
        raise ValueError(f"gram must be auto, bf16 or float64, got {gram!r}")
    if chunk_rows < 1:
        raise ValueError("chunk_rows must be >= 1")
    # auto: float32 factorizations refined to float64 answers when scipy is there (measured the fastest,
    # see benchmarks/stage1_ridge.py), else one float64 Cholesky factorization per alpha
    solver_used = ("mixed" if ridge.scipy_lapack() is not None else "cholesky") if solver == "auto" else solver
    paths = prep.resolve_embedding_files(embeddings)
    files = [SafetensorsFile(p) for p in paths]

    lab = _read_labels(files)                                                              # 1. read labels
    names = _objective_names(files, lab.K, objectives)
    masks = _group_masks(lab, names, val_fraction, seed, form, skip_unlabeled)           # 2. group masks
    fast = lab.emb_dtype == "BF16" and solver_used == "mixed" and ridge.bf16_gemm_kernel() is not None
    if gram == "bf16" and not fast:
        why = "the embeddings are not bf16" if lab.emb_dtype != "BF16" else \
            "it needs the mixed solver (scipy)" if solver_used != "mixed" else "this CPU has no AVX512_BF16"
        raise ValueError(f"gram='bf16' is not available: {why}; use gram='auto' or 'float64'")
    fit = _Fit(files, lab, masks, alphas, solver_used, chunk_rows, progress)
    t.append(time.perf_counter())
    with ridge.blas_pool(max_workers) as pool:
        fit.use_pool(pool, max_workers)
        fit.accumulate(masks.groups, "bf16" if fast and gram != "float64" else "float64", first=True)  # 3.
        t.append(time.perf_counter())
        fit.solve(masks.groups)                                                            # 4. solve
        t.append(time.perf_counter())
        fit.refine()                                                                       # 5. refine
    t.append(time.perf_counter())
    fit.validate()                                                                         # 6. validate
    t.append(time.perf_counter())
    weight = _choose_alphas(masks, alphas, names, lab.H)
    t.append(time.perf_counter())
    steps = ("read_labels", "accumulate", "solve", "refine", "validate")
    timings = {k: t[i + 1] - t[i] for i, k in enumerate(steps)}
    timings["total"] = t[-1] - t[0]
    rep = _report(paths, lab, masks, fit, names, val_fraction, seed, solver_used, timings)  # 7. report
    result = Stage1Result(weight, names, rep)
    if output is not None:
        output = os.fspath(output)
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        save_file({"regression_layer.weight": weight}, output,
                  metadata={"format": "pt", "objectives": json.dumps(names),
                            "alphas": json.dumps([e.get("alpha") for e in masks.entries])})
        report = report if report is not None else os.path.splitext(output)[0] + ".json"
        result.output = output
    if report is not None:
        report = os.fspath(report)
        write_json_atomic(report, rep)
        result.report_path = report
    if not quiet:
        print(result.table())
    return result
