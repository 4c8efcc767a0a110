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

Order of rows: the dataset is shuffled with `numpy.random.default_rng(seed)
.permutation(N)` (seed 0), which is exactly what `datasets.Dataset.shuffle(
seed=0)` does, then sharded. Sharding follows `datasets.Dataset.shard`:
`shard_mode="contiguous"` (datasets >= 3.1, the default) or `"strided"`
(rows i, i+n, i+2n, ...: datasets < 3.1, which the 2024 ArmoRM release ran
with). Shard indices are 1-based, as the reference's `--shard_idx`.

Resuming: rows are processed in chunks of `chunk_rows`; each finished chunk is
written (atomically) to a hidden work directory next to the output,
`.<file>.partial/`. Running the same command again skips finished chunks.
The final file is written to a temporary name and renamed, so it only ever
appears complete; the work directory is then removed. Changing settings that
affect the result (model, dataset, objectives, seed, shards, dtypes,
chunk_rows) makes a resume refuse with a clear error (`restart=True` starts
over). `batch_tokens` and threads can change between runs: a row's embedding
does not depend on what it was batched with.

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
  (kernel) form on the n x n Gram matrix. Validation MSE is computed from
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

Objectives without training or validation labels: a ValueError naming them,
or with `skip_unlabeled=True` a zero weight row that the report marks
`"skipped"` with the reason, plus a warning -- never a silent zero row.
"""
from __future__ import annotations

import contextlib
import functools
import glob as _glob
import hashlib
import json
import math
import os
import shutil
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..atomic import atomic_open
from ..config import ATTRIBUTES
from ..data import DatasetError, open_dataset
from ..safetensors_io import (SafetensorsError, SafetensorsFile, bf16_to_float32, float32_to_bf16, save_file,
                              to_float)

#: The reference's alpha grid.
DEFAULT_ALPHAS: List[float] = [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4]
#: Exact refinement of bf16-gram solutions stops when the estimated relative error (per column) is below this.
_REFINE_TOL = 1e-9
EMBEDDING_DTYPES = {"bfloat16": "BF16", "bf16": "BF16", "float32": "F32", "fp32": "F32"}
FORMAT_VERSION = 1
_META_KEY = "armorm_stage1"

ProgressArg = Union[None, bool, Callable[[int, int, int], None]]


# =========================================================================== helpers shared by both stages


def shard_file_name(name: str, shard_idx: int, n_shards: int) -> str:
    """The reference's shard naming: `<name>-<shard:05d>-of-<n_shards:05d>.safetensors`."""
    return f"{name}-{shard_idx:05d}-of-{n_shards:05d}.safetensors"


def shard_rows(n: int, *, seed: Optional[int] = 0, n_shards: int = 1, shard_idx: int = 1,
               shard_mode: str = "contiguous") -> np.ndarray:
    """Dataset rows of shard `shard_idx` (1-based) in processing order.

    `datasets`' `shuffle(seed)` (a `default_rng(seed)` permutation; `seed=None`:
    no shuffle), then `shard(n_shards, shard_idx - 1, contiguous=...)`.
    """
    if n_shards < 1:
        raise ValueError(f"n_shards must be >= 1, got {n_shards}")
    if not 1 <= shard_idx <= n_shards:
        raise ValueError(f"shard_idx must be in 1..{n_shards} (1-based, as the reference), got {shard_idx}")
    if shard_mode not in ("contiguous", "strided"):
        raise ValueError(f"shard_mode must be 'contiguous' or 'strided', got {shard_mode!r}")
    order = np.arange(n, dtype=np.int64) if seed is None else np.random.default_rng(seed).permutation(n)
    if n_shards == 1:
        return order
    i = shard_idx - 1
    if shard_mode == "strided":
        return order[i::n_shards]
    div, mod = divmod(n, n_shards)
    start = div * i + min(i, mod)
    return order[start:start + div + (1 if i < mod else 0)]


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


class _Progress:
    """tqdm bar (examples/s, tokens/s) when enabled, a stderr line without tqdm, or a user callback."""

    def __init__(self, arg: ProgressArg, total: int, initial: int, desc: str, unit: str = "ex") -> None:
        self.callback = arg if callable(arg) else None
        enabled = (sys.stderr.isatty() if arg is None else bool(arg)) and self.callback is None
        self.total, self.done, self.tokens = total, initial, 0
        self.start = time.monotonic()
        self.bar = None
        self.enabled = enabled
        self._last_print = 0.0
        if enabled:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr,
                                dynamic_ncols=True, smoothing=0.1)
            except ImportError:
                self.bar = None
        self.desc, self.unit = desc, unit

    def update(self, n_rows: int, n_tokens: int) -> None:
        self.done += n_rows
        self.tokens += n_tokens
        if self.callback is not None:
            self.callback(self.done, self.total, self.tokens)
            return
        if not self.enabled:
            return
        rate = self.tokens / max(time.monotonic() - self.start, 1e-9)
        if self.bar is not None:
            self.bar.set_postfix_str(f"{rate:,.0f} tok/s", refresh=False)
            self.bar.update(n_rows)
        else:
            now = time.monotonic()
            if now - self._last_print > 0.5 or self.done >= self.total:
                self._last_print = now
                ex = (self.done) / max(now - self.start, 1e-9)
                print(f"\r{self.desc}: {self.done}/{self.total} {self.unit} ({ex:.1f} {self.unit}/s, "
                      f"{rate:,.0f} tok/s)", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.callback is None:
            print(file=sys.stderr)


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr)


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


def _model_fingerprint(model: Any) -> Dict[str, Any]:
    path = getattr(model, "name_or_path", str(model))
    fp: Dict[str, Any] = {"path": os.path.abspath(path)}
    cfg = os.path.join(path, "config.json")
    if os.path.isfile(cfg):
        with open(cfg, "rb") as f:
            fp["config_sha256"] = hashlib.sha256(f.read()).hexdigest()
        fp["weights_bytes"] = sum(os.path.getsize(p) for p in _glob.glob(os.path.join(path, "*.safetensors")))
    return fp


def _load_model(model: Any, torch_dtype: str, num_threads: Optional[int], batch_tokens: int,
                check_finite: bool = True) -> Any:
    from ..model import ArmoRM
    if isinstance(model, ArmoRM):
        return model
    return ArmoRM.from_pretrained(model, architecture="LlamaModel", torch_dtype=torch_dtype,
                                  num_threads=num_threads, max_batch_tokens=batch_tokens, check_finite=check_finite)


def _tokenize(tok: Any, convs: List[List[Dict[str, Any]]], wheres: List[str]) -> List[np.ndarray]:
    """Chat-template + tokenize, one BOS (see the module docstring)."""
    from ..tokenizer import format_conversations
    try:
        ids = format_conversations(tok, convs)
    except Exception:
        # find the offending row to name it
        for conv, where in zip(convs, wheres):
            try:
                format_conversations(tok, [conv])
            except Exception as e:
                raise DatasetError(f"{where}: cannot apply the chat template: {e}") from None
        raise
    bos = getattr(tok, "bos_token_id", None)
    adds_bos = bool(getattr(tok, "add_bos_token", False))
    out = []
    for s, where in zip(ids, wheres):
        if bos is not None:
            if len(s) >= 2 and s[0] == bos and s[1] == bos:
                raise DatasetError(f"{where}: the formatted conversation starts with two BOS tokens ({bos}); "
                                   "the chat template must write BOS once (the tokenizer adds none here)")
            if adds_bos and (not s or s[0] != bos):
                s = [bos] + list(s)  # a template without BOS: the tokenizer's own BOS, as the reference gets
        if not s:
            raise DatasetError(f"{where}: the formatted conversation has no tokens")
        out.append(np.asarray(s, dtype=np.int32))
    return out


def _read_json(path: str) -> Any:
    with open(path, "r", encoding="utf-8") as f:
        return json.load(f)


def _write_json_atomic(path: str, obj: Any) -> None:
    with atomic_open(path) as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def _diff(a: Dict[str, Any], b: Dict[str, Any]) -> str:
    keys = sorted(set(a) | set(b))
    return ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys if a.get(k) != b.get(k))


def _already_done(final: str, settings: Dict[str, Any], meta_key: str, command: str, overwrite: bool,
                  quiet: bool) -> bool:
    """True when `final` exists and was written with `settings` (kept unless `overwrite`).

    Raises ValueError when it exists with other settings and `overwrite` is False.
    """
    if not os.path.exists(final):
        return False
    try:
        old = json.loads(SafetensorsFile(final).metadata.get(meta_key, "null"))
    except (SafetensorsError, ValueError):
        old = None
    if overwrite:
        return False
    if old == settings:
        _log(f"{final} is already complete", quiet)
        return True
    why = _diff(old, settings) if isinstance(old, dict) else f"it was not written by armorm {command}"
    raise ValueError(f"{final} exists with different settings ({why}); pass overwrite=True "
                     "(--overwrite) to replace it")


def _work_dir(output: str, final: str, settings: Dict[str, Any], chunk_rows: int, restart: bool) -> str:
    """The hidden folder that holds a run's finished chunks until `final` is written.

    Created with a job.json of the settings, or, when an interrupted run left
    one, checked against them (`restart` discards it). Also removes the
    temporary file of a final write that was killed midway.
    """
    for stale in _glob.glob(os.path.join(_glob.escape(output), f".{_glob.escape(os.path.basename(final))}.*.tmp")):
        try:
            os.unlink(stale)
        except OSError:
            pass
    work = os.path.join(output, f".{os.path.basename(final)}.partial")
    work_settings = dict(settings, chunk_rows=chunk_rows)
    meta_path = os.path.join(work, "job.json")
    if restart and os.path.isdir(work):
        shutil.rmtree(work)
    if os.path.isfile(meta_path):
        try:
            old = _read_json(meta_path)
        except (OSError, ValueError):
            old = None
        if old != work_settings:
            why = _diff(old, work_settings) if isinstance(old, dict) else "unreadable job.json"
            raise ValueError(f"{work} holds an interrupted run with different settings ({why}); "
                             "pass restart=True (--restart) to discard it, or rerun with the same settings")
    else:
        os.makedirs(work, exist_ok=True)
        _write_json_atomic(meta_path, work_settings)
    return work


def _chunk_path(work: str, c: int) -> str:
    return os.path.join(work, f"chunk-{c:06d}.safetensors")


def _valid_chunk(path: str, rows: int, K: int) -> bool:
    try:
        f = SafetensorsFile(path)
        e, lab = f.info("embeddings"), f.info("labels")
        return e.shape[0] == rows and lab.shape == (rows, K)
    except (SafetensorsError, OSError):
        return False


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
    `restart`: discard the partial work of an interrupted run.
    """
    objectives = _resolve_objectives(objectives)
    K = len(objectives)
    st_dtype = EMBEDDING_DTYPES.get(str(embeddings_dtype).replace("torch.", "").lower())
    if st_dtype is None:
        raise ValueError(f"embeddings_dtype must be 'bfloat16' or 'float32', got {embeddings_dtype!r}")
    embeddings_dtype = "bfloat16" if st_dtype == "BF16" else "float32"
    if chunk_rows < 1:
        raise ValueError("chunk_rows must be >= 1")
    if batch_tokens < 1:
        raise ValueError("batch_tokens must be >= 1")
    src = open_dataset(dataset, split=split, columns=["messages", *objectives])
    cols = src.columns()
    if cols is not None:
        missing = [c for c in ["messages", *objectives] if c not in cols]
        if missing:
            raise DatasetError(f"{src.location}: the dataset has no column(s) {', '.join(missing)} "
                               f"(it has {', '.join(cols)}); set the objectives to the label columns")
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
    if not isinstance(model, (str, os.PathLike)):
        model_fp["dtype"] = getattr(model, "dtype", None)
    else:
        model_fp["dtype"] = str(torch_dtype)
    settings = {"version": FORMAT_VERSION, "model": model_fp, "dataset": src.fingerprint(), "split": split,
                "seed": seed, "n_shards": n_shards, "shard_idx": shard_idx, "shard_mode": shard_mode,
                "objectives": objectives, "embeddings_dtype": embeddings_dtype, "rows": int(rows.size)}
    settings = json.loads(json.dumps(settings))  # normalized (tuples -> lists) for comparisons

    if _already_done(final, settings, _META_KEY, "prepare-stage1", overwrite, quiet):
        return final

    work = _work_dir(output, final, settings, chunk_rows, restart)

    n_chunks = -(-rows.size // chunk_rows)
    bounds = [(c * chunk_rows, min(rows.size, (c + 1) * chunk_rows)) for c in range(n_chunks)]
    done = {c for c, (a, b) in enumerate(bounds) if _valid_chunk(_chunk_path(work, c), b - a, K)}
    todo = [c for c in range(n_chunks) if c not in done]
    if done:
        _log(f"resuming: {len(done)} of {n_chunks} chunks already done in {work}", quiet)

    if todo:
        rm = tok = None
        max_pos = 0
        done_rows = sum(bounds[c][1] - bounds[c][0] for c in done)
        bar = _Progress(progress, int(rows.size), done_rows, desc=f"embedding {os.path.basename(final)}")
        try:
            for c in todo:
                a, b = bounds[c]
                idx = rows[a:b]
                recs = src.take(idx)
                wheres = [src.where(int(r)) for r in idx]
                labels = np.empty((len(idx), K), dtype=np.float32)
                convs = []
                for j, (rec, where) in enumerate(zip(recs, wheres)):
                    convs.append(_messages(rec, where))
                    for k, o in enumerate(objectives):
                        labels[j, k] = _label(rec.get(o), o, where)
                if rm is None:  # loaded once the first rows are known to be good
                    rm = _load_model(model, torch_dtype, num_threads, batch_tokens, check_finite)
                    tok = rm.tokenizer
                    if tok is None:
                        raise ValueError(f"{rm.name_or_path} has no tokenizer (tokenizer.json); stage 1 formats "
                                         "conversations with the model's chat template")
                    max_pos = rm.config.max_position_embeddings
                seqs = _tokenize(tok, convs, wheres)
                for s, where in zip(seqs, wheres):
                    if s.size > max_pos:
                        raise DatasetError(f"{where}: the conversation has {s.size} tokens; the model allows "
                                           f"at most {max_pos} (max_position_embeddings)")
                cum = np.cumsum([s.size for s in seqs])
                state = {"rows": 0}

                def on_batch(n_done: int, _total: int) -> None:
                    prev = state["rows"]
                    state["rows"] = n_done
                    toks = int(cum[n_done - 1] - (cum[prev - 1] if prev else 0))
                    bar.update(n_done - prev, toks)

                hidden = rm.score_sequences(seqs, fields=["hidden_state"], batch_tokens=batch_tokens,
                                            progress=on_batch)["hidden_state"]
                hidden = np.asarray(hidden, dtype=np.float32)
                save_file({"embeddings": hidden, "labels": labels}, _chunk_path(work, c),
                          metadata={"tokens": str(int(cum[-1]))}, dtypes={"embeddings": st_dtype})
        finally:
            bar.close()

    # assemble the shard from the chunks, streaming
    files = [SafetensorsFile(_chunk_path(work, c)) for c in range(n_chunks)]
    H = files[0].info("embeddings").shape[1]
    for f in files:
        if f.info("embeddings").shape[1:] != (H,) or f.info("embeddings").dtype != st_dtype:
            raise ValueError(f"{f.path}: chunk does not match the others; pass restart=True to redo the shard")
    labels_all = np.concatenate([f.read("labels") for f in files], axis=0)
    for k in np.flatnonzero(np.isnan(labels_all).all(axis=0)):
        msg = (f"objective {objectives[int(k)]!r} has no label in any of the {rows.size} rows of this shard "
               "(check the objective names)")
        warnings.warn(msg, stacklevel=2)
        _log(f"warning: {msg}", quiet)
    meta = {"format": "pt", _META_KEY: json.dumps(settings), "objectives": json.dumps(objectives)}
    save_file({"embeddings": (st_dtype, (int(rows.size), H), (f.read("embeddings") for f in files)),
               "labels": ("F32", (int(rows.size), K), (f.read("labels") for f in files))},
              final, metadata=meta)
    shutil.rmtree(work, ignore_errors=True)
    _log(f"wrote {rows.size} embeddings [{rows.size}, {H}] {embeddings_dtype} and labels [{rows.size}, {K}] "
         f"to {final}", quiet)
    return final


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


def resolve_embedding_files(embeddings: Any) -> List[str]:
    """Files from a glob, a directory (its *.safetensors), a file, or a list of those; sorted by path.

    Sorted, as the reference's `sorted(glob(...))`: the row order (and so the
    train/validation split) does not depend on the order given.
    """
    items = [embeddings] if isinstance(embeddings, (str, os.PathLike)) else list(embeddings)
    if not items:
        raise ValueError("no embedding files given")
    files: List[str] = []
    for it in items:
        p = os.path.expanduser(os.fspath(it))
        if os.path.isdir(p):
            found = _glob.glob(os.path.join(p, "*.safetensors"))
            if not found:
                raise FileNotFoundError(f"{p}: no .safetensors files in this directory")
        elif _glob.has_magic(p):
            found = _glob.glob(p)
            if not found:
                raise FileNotFoundError(f"no files match {p}")
        elif os.path.isfile(p):
            found = [p]
        else:
            raise FileNotFoundError(f"{p}: no such file")
        files.extend(found)
    return sorted(set(os.path.normpath(f) for f in files))


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
    solver: Optional["_MixedSolver"] = None  # kept for the corrections of a bf16-gram solution
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


def _decode_into(raw: np.ndarray, st_dtype: str, out: np.ndarray) -> None:
    """Stored embedding rows -> float64 `out` (exact: every stored dtype is a subset of float64)."""
    if st_dtype == "BF16":
        out[...] = (raw.astype(np.uint32) << np.uint32(16)).view(np.float32)
    else:
        out[...] = raw


def _add_diag(M: np.ndarray, a: float) -> np.ndarray:
    out = M.copy()
    out.flat[:: M.shape[0] + 1] += a
    return out


def _tri_solve(L: np.ndarray, B: np.ndarray, lower: bool, block: int = 256) -> np.ndarray:
    """Solves L X = B (lower) or L^T X = B (lower=False: L is the lower factor), blocked."""
    n = L.shape[0]
    X = np.array(B, dtype=np.float64, copy=True)
    starts = list(range(0, n, block))
    if lower:
        for i0 in starts:
            i1 = min(n, i0 + block)
            if i0:
                X[i0:i1] -= L[i0:i1, :i0] @ X[:i0]
            X[i0:i1] = np.linalg.solve(L[i0:i1, i0:i1], X[i0:i1])
    else:
        U = L.T
        for i0 in reversed(starts):
            i1 = min(n, i0 + block)
            if i1 < n:
                X[i0:i1] -= U[i0:i1, i1:] @ X[i1:]
            X[i0:i1] = np.linalg.solve(U[i0:i1, i0:i1], X[i0:i1])
    return X


def _solve_all_alphas(M: np.ndarray, B: np.ndarray, alphas: Sequence[float], solver: str, threads: int = 1,
                      scratch: Optional[_Scratch] = None) -> Tuple[List[np.ndarray], Dict[str, int],
                                                                   Optional["_MixedSolver"]]:
    """Solutions of (M + alpha I) X = B for every alpha (M symmetric positive semi-definite).

    "mixed": float32 Cholesky factors refined to float64 accuracy
    (`_MixedSolver`, returned too, for corrections); "cholesky": one float64
    factorization per alpha; "lu"; "eigh": one eigendecomposition for all
    alphas (also the fallback when a Cholesky factorization finds the matrix
    numerically indefinite). Returns the solutions, what was done
    (`{method: 1, "float32 factorizations": n, ...}`) and the mixed solver
    (which runs its factorizations on up to `threads` threads).
    """
    if solver == "mixed":
        lapack = _scipy_lapack()
        if lapack is None:
            solver = "cholesky"
        else:
            try:
                ms = _MixedSolver(M, alphas, lapack, threads, scratch)
                W = ms.solve([B] * len(alphas))
                return W, {"mixed": 1, **ms.counts}, ms
            except np.linalg.LinAlgError:
                solver = "eigh"
    if solver == "cholesky":
        try:
            out = []
            for a in alphas:
                L = np.linalg.cholesky(_add_diag(M, a))
                out.append(_tri_solve(L, _tri_solve(L, B, lower=True), lower=False))
            return out, {"cholesky": 1, "float64 factorizations": len(out)}, None
        except np.linalg.LinAlgError:
            solver = "eigh"  # numerically indefinite for a tiny alpha: the eigendecomposition copes
    if solver == "lu":
        return [np.linalg.solve(_add_diag(M, a), B) for a in alphas], {"lu": 1}, None
    lam, Q = np.linalg.eigh(M)
    lam = np.maximum(lam, 0.0)  # M is a Gram matrix: negative eigenvalues are rounding
    QtB = Q.T @ B
    return [Q @ (QtB / (lam + a)[:, None]) for a in alphas], {"eigh": 1}, None


# ---------------------------------------------------------------- mixed precision: float32 factors, float64 answers


@functools.lru_cache(maxsize=None)
def _scipy_lapack() -> Optional["_Lapack"]:
    """LAPACK's Cholesky routines from scipy (an optional dependency), or None without scipy.

    numpy has no triangular solve and its Cholesky copies the matrix twice.
    """
    try:
        from scipy.linalg import cython_lapack
        return _Lapack(cython_lapack)
    except (ImportError, AttributeError, KeyError, TypeError):
        return None


class _Lapack:
    """potrf / potrs of scipy's LAPACK, called so that the GIL is released during the call.

    scipy's Python wrappers (scipy.linalg.lapack) hold the GIL while LAPACK
    runs, so solves in threads would take turns (measured); the same routines
    called through ctypes, from the function pointers scipy.linalg.cython_lapack
    exports, release it, and the label masks' solves use every core.
    Matrices are C-ordered and symmetric: LAPACK sees their transpose, the
    same matrix; the factor L is stored as L^T in the upper triangle.
    """

    def __init__(self, cython_lapack: Any) -> None:
        import ctypes as C
        capi = cython_lapack.__pyx_capi__
        name_of, ptr_of = C.pythonapi.PyCapsule_GetName, C.pythonapi.PyCapsule_GetPointer
        name_of.restype, name_of.argtypes = C.c_char_p, [C.py_object]
        ptr_of.restype, ptr_of.argtypes = C.c_void_p, [C.py_object, C.c_char_p]
        i = C.POINTER(C.c_int)
        potrf = C.CFUNCTYPE(None, C.c_char_p, i, C.c_void_p, i, i)
        potrs = C.CFUNCTYPE(None, C.c_char_p, i, i, C.c_void_p, i, C.c_void_p, i, i)

        def fn(name: str, proto: Any) -> Any:
            cap = capi[name]
            return proto(ptr_of(cap, name_of(cap)))

        self._potrf = {np.dtype(np.float32): fn("spotrf", potrf), np.dtype(np.float64): fn("dpotrf", potrf)}
        self._potrs = {np.dtype(np.float32): fn("spotrs", potrs), np.dtype(np.float64): fn("dpotrs", potrs)}
        self._C = C

    def _check(self, A: np.ndarray) -> None:
        if A.ndim != 2 or A.shape[0] != A.shape[1] or not A.flags.c_contiguous or A.dtype not in self._potrf:
            raise ValueError(f"LAPACK needs a C-contiguous square float32/float64 matrix, got {A.dtype} "
                             f"{list(A.shape)}")

    def potrf(self, A: np.ndarray) -> int:
        """Factors the C-ordered symmetric positive definite A in place; LAPACK's info (0: done)."""
        self._check(A)
        C = self._C
        n, info = C.c_int(A.shape[0]), C.c_int(0)
        self._potrf[A.dtype](b"L", C.byref(n), A.ctypes.data, C.byref(n), C.byref(info))
        return info.value

    def potrs(self, L: np.ndarray, R: np.ndarray) -> np.ndarray:
        """(L L^T)^-1 R for a factor from `potrf` (R [n, m] is converted to L's dtype)."""
        self._check(L)
        if R.ndim != 2 or R.shape[0] != L.shape[0]:
            raise ValueError(f"right-hand sides {list(R.shape)} do not fit a {L.shape[0]} x {L.shape[0]} factor")
        C = self._C
        n, m = R.shape
        X = np.empty((m, n), dtype=L.dtype)  # LAPACK's column-major n x m
        X[...] = R.T
        nn, mm, info = C.c_int(n), C.c_int(m), C.c_int(0)
        self._potrs[L.dtype](b"L", C.byref(nn), C.byref(mm), L.ctypes.data, C.byref(nn), X.ctypes.data,
                             C.byref(nn), C.byref(info))
        if info.value:
            raise np.linalg.LinAlgError(f"potrs: argument {-info.value} is invalid")
        return X.T


class _Scratch:
    """Large arrays handed back for reuse by later requests of the same size in bytes (thread-safe).

    First touching fresh memory (the kernel clearing its pages) was measured
    at 0.5-2 GB/s on a small VM: for the factors and row buffers of a run,
    about as much time as the factorizations themselves.
    """

    def __init__(self) -> None:
        self._free: Dict[int, List[np.ndarray]] = {}  # by size in bytes: raw uint8 buffers
        self._lock = threading.Lock()

    def get(self, shape: Tuple[int, ...], dtype: Any) -> np.ndarray:
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        with self._lock:
            free = self._free.get(nbytes)
            buf = free.pop() if free else None
        return np.empty(shape, dtype=dtype) if buf is None else buf.view(dtype).reshape(shape)

    def put(self, a: Optional[np.ndarray]) -> None:
        """Hands `a` (C-contiguous; nothing else may use it any more) back for reuse."""
        if a is not None and a.flags.c_contiguous and a.nbytes:
            with self._lock:
                self._free.setdefault(a.nbytes, []).append(a.reshape(-1).view(np.uint8))


def _pow2(x: float) -> float:
    """The power of two nearest below 1/|x| (1.0 for 0 or non-finite): an exact scale factor."""
    return 2.0 ** -math.frexp(x)[1] if x and math.isfinite(x) else 1.0


class _Factor:
    """Lower Cholesky factor of `scale * (M + alpha I)` in float32 or float64; `ok` False if not positive definite.

    `scale` (a power of two) brings M's diagonal to about 1, so the float32
    copy neither overflows nor underflows.
    """

    def __init__(self, lapack: _Lapack, M: np.ndarray, alpha: float, dtype: Any, scale: float,
                 scratch: Optional[_Scratch] = None) -> None:
        n = M.shape[0]
        self.L = scratch.get(M.shape, dtype) if scratch is not None else np.empty(M.shape, dtype=dtype)
        np.multiply(M, scale, out=self.L, casting="same_kind")
        self.L.flat[:: n + 1] += dtype(alpha * scale)
        self.ok = lapack.potrf(self.L) == 0 and bool(np.isfinite(self.L.diagonal()).all())
        self.lapack, self.alpha, self.dtype, self.scale = lapack, alpha, dtype, scale

    def solve(self, R: np.ndarray) -> np.ndarray:
        """Approximately (M + alpha I)^-1 R, float64 (each column scaled by a power of two on the way)."""
        c = np.array([_pow2(v) for v in np.abs(R).max(axis=0)]) if R.size else np.ones(R.shape[1])
        return self.lapack.potrs(self.L, R * c).astype(np.float64) * (self.scale / c)


def _col_change(D: np.ndarray, W: np.ndarray) -> float:
    """Largest per-column ratio max|D| / max|W| (a column of zeros changing by zeros: 0)."""
    d, w = np.abs(D).max(axis=0), np.abs(W).max(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(d == 0, 0.0, d / w)
    return float(np.max(r)) if r.size else 0.0


class _MixedSolver:
    """(M + alpha I) X = R_alpha for every alpha of a grid: float32 Cholesky factors, float64 refinement.

    Every alpha's solution is refined in float64 against M itself
    (X += F^-1 (R - (M + alpha I) X), F a factorization) until the estimated
    remaining change is below `tol` relative to the solution, per column: the
    answer is the float64 one, the factorizations cost float32 time.
    Factors are shared: the smallest alpha's factor serves every alpha for
    which that refinement converges fast (alpha well below M's smallest
    eigenvalue: the error shrinks by about (alpha - a0) / (lambda_min + a0) per
    sweep); the others get their own float32 factor, and a float64 one when
    float32 is too coarse for the conditioning (slow or no convergence). All
    alphas are refined in lock step, so M is read once per sweep. The factors
    are kept: later `solve` calls (corrections) reuse them. Raises
    LinAlgError when even a float64 factorization fails (the caller then uses
    the eigendecomposition).
    """

    def __init__(self, M: np.ndarray, alphas: Sequence[float], lapack: _Lapack, threads: int = 1,
                 scratch: Optional[_Scratch] = None) -> None:
        self.M, self.alphas, self.lapack, self.threads, self.scratch = M, list(alphas), lapack, threads, scratch
        diag = M.diagonal()
        self.scale = _pow2(float(diag.max())) if diag.size else 1.0
        self.counts = {"float32 factorizations": 0, "float64 factorizations": 0, "refinement sweeps": 0}
        first = int(np.argmin(self.alphas))
        shared = self._count(self._factor(self.alphas[first], np.float32))
        self.fac = [shared] * len(self.alphas)
        self.own = [i == first for i in range(len(self.alphas))]

    def _factor(self, a: float, dtype: Any) -> _Factor:
        """Factor of M + a I in `dtype`, float64 when float32 finds it indefinite (thread-safe)."""
        for dt in ((np.float32, np.float64) if dtype == np.float32 else (np.float64,)):
            f = _Factor(self.lapack, self.M, a, dt, self.scale, self.scratch)
            if f.ok:
                return f
            if self.scratch is not None:
                self.scratch.put(f.L)
        raise np.linalg.LinAlgError(f"M + {a} I is not numerically positive definite")

    def _count(self, f: _Factor) -> _Factor:
        self.counts["float32 factorizations" if f.dtype == np.float32 else "float64 factorizations"] += 1
        return f

    def release(self) -> None:
        """Hands the factors back to the scratch pool; the solver cannot be used afterwards."""
        if self.scratch is not None:
            for f in {id(f): f for f in self.fac}.values():
                self.scratch.put(f.L)
        self.fac = []

    def _better_factor(self, i: int) -> Optional[_Factor]:
        """Alpha i's own float32 factor when it shares one, float64 when it has float32; None after that."""
        if not self.own[i]:
            return self._factor(self.alphas[i], np.float32)
        return self._factor(self.alphas[i], np.float64) if self.fac[i].dtype == np.float32 else None

    def solve(self, rhs: Sequence[np.ndarray], tol: float = 1e-10, max_sweeps: int = 60) -> List[np.ndarray]:
        """X_i with (M + alpha_i I) X_i = rhs[i], for every alpha i (float64 [n, k] each)."""
        M, alphas = self.M, self.alphas
        na = len(alphas)
        n, k = rhs[0].shape
        W = [np.zeros((n, k)) for _ in range(na)]
        change = [math.inf] * na  # last relative correction
        done = [False] * na
        for _ in range(max_sweeps):
            act = [i for i in range(na) if not done[i]]
            if not act:
                return W
            self.counts["refinement sweeps"] += 1
            R = np.concatenate([rhs[i] for i in act], axis=1)
            Wa = np.concatenate([W[i] for i in act], axis=1)
            if np.any(Wa):
                R -= M @ Wa + Wa * np.repeat([alphas[i] for i in act], k)
            D = np.empty_like(R)
            slow: List[int] = []
            by_factor: Dict[int, Tuple[_Factor, List[int]]] = {}
            for j, i in enumerate(act):
                by_factor.setdefault(id(self.fac[i]), (self.fac[i], []))[1].extend(range(j * k, (j + 1) * k))
            for f, cols in by_factor.values():
                D[:, cols] = f.solve(R[:, cols])
            for j, i in enumerate(act):
                W[i] += D[:, j * k:(j + 1) * k]
                prev, change[i] = change[i], _col_change(D[:, j * k:(j + 1) * k], W[i])
                if not (math.isfinite(change[i]) and np.isfinite(W[i]).all()):
                    rate = math.inf
                elif change[i] == 0.0:
                    done[i] = True
                    continue
                else:
                    rate = change[i] / prev if math.isfinite(prev) else math.nan
                    if rate < 0.5 and change[i] * rate / (1.0 - rate) <= tol:
                        done[i] = True  # the remaining change is estimated below tol
                        continue
                    if math.isnan(rate):
                        continue  # the first correction with this factor: no rate yet
                # too slow: a shared factor is too far from this alpha, a float32 one too coarse for the
                # conditioning; a float64 factor that stagnates has reached a float64 solve's accuracy
                limit = 0.1 if not self.own[i] else 0.25 if self.fac[i].dtype == np.float32 else 0.5
                if rate > limit:
                    slow.append(i)
            # the new factorizations of a sweep are independent: on all cores (LAPACK releases the GIL)
            slow_fac = _thread_map(self.threads, self._better_factor, slow)
            for i, f in zip(slow, slow_fac):
                if f is not None:
                    if self.own[i] and self.scratch is not None:
                        self.scratch.put(self.fac[i].L)  # its float32 factor is replaced: no one else uses it
                    self.fac[i], self.own[i] = self._count(f), True
                    W[i][...] = 0.0
                    change[i] = math.inf
                elif change[i] <= 1e-2:
                    done[i] = True  # corrections at the noise level of float64 for this conditioning
                else:
                    raise np.linalg.LinAlgError(f"no convergence for alpha {alphas[i]}")
        raise np.linalg.LinAlgError("iterative refinement did not converge")


def _usable_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def _pool_size(max_workers: Optional[int]) -> int:
    return min(max_workers or _usable_cpus(), 8)  # 8: bounds the memory of the per-group solves


def _bf16_gemm_kernel() -> Optional[str]:
    """The core's bf16 GEMM kernel when it is a fast one (AVX512_BF16), else None."""
    try:
        from .. import _core
        kernel = _core.gemm_kernel()
    except (ImportError, AttributeError):
        return None
    return None if kernel == "portable" else kernel


@contextlib.contextmanager
def _blas_pool(max_workers: Optional[int]) -> Iterator[Optional[Any]]:
    """A pool of threads that each run one-thread BLAS (None: one thread), for the `with` block.

    The X^T X blocks and the per-group solves are independent: one per core,
    each with a one-thread BLAS, avoids the synchronisation of multithreaded
    BLAS/LAPACK (on a small machine many times slower than one thread,
    measured: its threads spin while other threads compute) and gives results
    that do not depend on the thread count. Needs the optional threadpoolctl
    to set the BLAS threads; without it, no pool and BLAS's own threading.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield None
        return
    _scipy_lapack()  # load scipy's own BLAS now: the limit applies to the libraries already loaded
    workers = _pool_size(max_workers)
    with threadpool_limits(limits=1, user_api="blas"):
        if workers <= 1:
            yield None
            return
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(workers) as ex:
            yield ex


def _pool_map(pool: Optional[Any], fn: Callable[[Any], Any], tasks: Sequence[Any]) -> List[Any]:
    return list(pool.map(fn, tasks)) if pool is not None and len(tasks) > 1 else [fn(t) for t in tasks]


def _thread_map(threads: int, fn: Callable[[Any], Any], tasks: Sequence[Any]) -> List[Any]:
    """`[fn(t) for t in tasks]` on up to `threads` new threads (usable inside a pool's task)."""
    if threads <= 1 or len(tasks) <= 1:
        return [fn(t) for t in tasks]
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(min(threads, len(tasks))) as ex:
        return list(ex.map(fn, tasks))


def _gram_add(A: np.ndarray, S: np.ndarray, pool: Optional[Any]) -> None:
    """A += S^T S on and below the diagonal, in row blocks (about half the work of the full product).

    The upper triangle is left stale: `_mirror_lower` completes A at the end.
    """
    H = A.shape[0]
    step = max(64, -(-H // 8 // 64) * 64)
    blocks = [(i0, min(H, i0 + step)) for i0 in range(0, H, step)]

    def one(b: Tuple[int, int]) -> None:
        i0, i1 = b
        A[i0:i1, :i1] += S[:, i0:i1].T @ S[:, :i1]

    _pool_map(pool, one, blocks[::-1])  # the largest blocks first: the threads finish together


def _mirror_lower(A: np.ndarray, step: int = 512) -> None:
    """Copies the strictly lower triangle of A onto the upper one."""
    H = A.shape[0]
    for i0 in range(0, H, step):
        i1 = min(H, i0 + step)
        D = A[i0:i1, i0:i1]
        upper = np.triu_indices(i1 - i0, 1)
        D[upper] = D.T[upper]
        A[i0:i1, i1:] = A[i1:, i0:i1].T


def _bf16_parts(Y: np.ndarray) -> np.ndarray:
    """float64 [n, k] -> bf16 bits [n, 3k]: Y ~= part0 + part1 + part2 (24 significant bits, float32's)."""
    parts, r = [], np.asarray(Y, dtype=np.float64)
    for _ in range(3):
        p = float32_to_bf16(r.astype(np.float32))
        parts.append(p)
        r = r - bf16_to_float32(p)
    return np.ascontiguousarray(np.concatenate(parts, axis=1))


class _Gram:
    """X^T X and X^T Y of one label mask's training rows, accumulated as the rows stream by.

    Rows are staged as stored and multiplied `stage_rows` at a time. mode
    "float64": exact (every stored dtype is a subset of float64): the staged
    rows decoded into `work` (float64 [stage_rows, H], shared by the groups),
    lower triangle only, in row blocks on the pool's threads. mode "bf16"
    (bf16 rows, the core's AVX512_BF16 GEMM): exact products, float32 sums
    over each block of `stage_rows` rows (into `work`, float32 [H, H]),
    float64 across blocks; X^T Y the same way from Y split into three bf16
    parts. An approximation (about 1e-6 relative): `train` refines its
    solutions against the exact rows afterwards.
    """

    def __init__(self, H: int, k: int, rows: int, mode: str, st_dtype: str, pool: Optional[Any], threads: int,
                 work: np.ndarray, scratch: _Scratch, stage_rows: int = 4096) -> None:
        stored = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32, "F64": np.float64}[st_dtype]
        self.A = np.zeros((H, H), dtype=np.float64)
        self.B = np.zeros((H, k), dtype=np.float64)
        self.mode, self.st_dtype, self.pool, self.threads, self.work = mode, st_dtype, pool, threads, work
        self.scratch = scratch
        self.S = scratch.get((min(stage_rows, rows), H), stored)
        self.SY = np.empty((self.S.shape[0], k), dtype=np.float64)
        self.fill = 0

    def add(self, raw: np.ndarray, st_dtype: str, Y: np.ndarray) -> None:
        """Adds embedding rows as stored (`st_dtype`) and their labels."""
        pos = 0
        while pos < len(raw):
            take = min(len(raw) - pos, self.S.shape[0] - self.fill)
            dst = self.S[self.fill:self.fill + take]
            dst[...] = raw[pos:pos + take] if st_dtype == self.st_dtype else \
                to_float(raw[pos:pos + take], st_dtype, self.S.dtype)  # files of mixed dtypes: as float
            self.SY[self.fill:self.fill + take] = Y[pos:pos + take]
            self.fill += take
            pos += take
            if self.fill == self.S.shape[0]:
                self._flush()

    def _flush(self) -> None:
        if not self.fill:
            return
        S, SY = self.S[:self.fill], self.SY[:self.fill]
        if self.mode == "bf16":
            from .. import _core
            _core.gemm(S, S, trans_a=True, out=self.work, num_threads=self.threads)
            self.A += self.work
            k = SY.shape[1]
            self.B += _core.gemm(S, _bf16_parts(SY), trans_a=True, num_threads=self.threads) \
                .reshape(-1, 3, k).sum(axis=1, dtype=np.float64)
        else:
            X = self.work[:self.fill]
            _decode_into(S, self.st_dtype, X)
            _gram_add(self.A, X, self.pool)
            self.B += X.T @ SY
        self.fill = 0

    def finish(self) -> Tuple[np.ndarray, np.ndarray]:
        """(X^T X, X^T Y); hands the staging buffer back."""
        self._flush()
        self.scratch.put(self.S)
        self.S = self.SY = self.work = None
        _mirror_lower(self.A)  # float64: the upper triangle is stale; bf16: ~equal, one triangle is used
        return self.A, self.B


def _stream(files: List[SafetensorsFile], offsets: np.ndarray, chunk_rows: int, row_sets: Sequence[np.ndarray],
            bar: Optional[_Progress] = None, check: bool = False,
            scratch: Optional[_Scratch] = None) -> Iterator[Tuple[str, np.ndarray, int, List[Tuple[int, int]]]]:
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
                        bufs[e.dtype] = scratch.get(shape, e.np_dtype) if scratch else np.empty(shape, e.np_dtype)
                    raw = f.read_rows("embeddings", a, b, out=bufs[e.dtype][:b - a])
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
                     alphas: Sequence[float], pool: Optional[Any], scratch: _Scratch,
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
            _decode_into(raw[g.train_rows[a:b] - ga], st, Xb)
            U = np.tile(g.Ytr[a:b], (1, na))
            U -= Xb @ W_all[gi]
            acc[gi] += Xb.T @ U
        scratch.put(X)

    for st, raw, ga, spans in _stream(files, offsets, chunk_rows, [g.train_rows for g in groups], scratch=scratch):
        # one task per group and chunk: a group's sum is only ever updated by one thread at a time
        _pool_map(pool, one, [(gi, st, raw, ga, lo, hi) for gi, (lo, hi) in enumerate(spans) if hi > lo])
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
    t0 = time.perf_counter()
    alphas = [float(a) for a in alphas]
    if not alphas or any(not (a > 0 and math.isfinite(a)) for a in alphas):
        raise ValueError(f"alphas must be positive finite numbers, got {alphas}")
    if solver not in ("auto", "mixed", "cholesky", "eigh", "lu"):
        raise ValueError(f"solver must be auto, mixed, cholesky, eigh or lu, got {solver!r}")
    if solver == "mixed" and _scipy_lapack() is None:
        raise ValueError("solver='mixed' needs scipy (its LAPACK wrappers); install scipy or use 'cholesky'")
    if form not in ("auto", "primal", "dual"):
        raise ValueError(f"form must be auto, primal or dual, got {form!r}")
    if gram not in ("auto", "bf16", "float64"):
        raise ValueError(f"gram must be auto, bf16 or float64, got {gram!r}")
    if chunk_rows < 1:
        raise ValueError("chunk_rows must be >= 1")
    # auto: float32 factorizations refined to float64 answers when scipy is there (measured the fastest,
    # see benchmarks/stage1_ridge.py), else one float64 Cholesky factorization per alpha
    solver_used = ("mixed" if _scipy_lapack() is not None else "cholesky") if solver == "auto" else solver
    paths = resolve_embedding_files(embeddings)
    files = [SafetensorsFile(p) for p in paths]

    # ---- shapes, labels ------------------------------------------------------------------
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
        y = to_float(f.read("labels"), lab.dtype, np.float32)
        bad = np.isinf(y)
        if bad.any():
            r, k = np.argwhere(bad)[0]
            raise ValueError(f"{f.path}: row {r}, objective column {k}: infinite label")
        counts.append(e.shape[0])
        label_parts.append(y)
    assert H is not None and K is not None
    Y = np.concatenate(label_parts, axis=0)
    N = int(Y.shape[0])
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    names = _objective_names(files, K, objectives)

    # ---- split, masks, groups ----------------------------------------------------------------
    _, test_idx = train_test_split_indices(N, float(val_fraction), seed)
    is_val = np.zeros(N, dtype=bool)
    is_val[test_idx] = True
    mask = ~np.isnan(Y)
    entries: List[Dict[str, Any]] = [{} for _ in range(K)]
    problems: List[str] = []
    report_warnings: List[str] = []
    by_mask: Dict[bytes, List[int]] = {}
    for k in range(K):
        m = mask[:, k]
        n_tr = int((m & ~is_val).sum())
        n_va = int((m & is_val).sum())
        entries[k] = {"index": k, "objective": names[k], "train_count": n_tr, "val_count": n_va}
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
            report_warnings.append(msg)
            warnings.warn(msg, stacklevel=2)
    groups: List[_Group] = []
    for ks in by_mask.values():
        m = mask[:, ks[0]]
        g = _Group(ks, np.flatnonzero(m & ~is_val), np.flatnonzero(m & is_val))
        g.form = form if form != "auto" else ("dual" if g.train_rows.size < H else "primal")
        if g.form == "dual" and g.train_rows.size > 32768:
            raise ValueError(f"form='dual' would build a {g.train_rows.size} x {g.train_rows.size} kernel matrix "
                             f"for {', '.join(names[k] for k in ks)}; use form='auto' (primal when rows >= H)")
        g.Ytr = Y[g.train_rows][:, ks].astype(np.float64)
        groups.append(g)
    val_rows = np.unique(np.concatenate([g.val_rows for g in groups])) if groups else np.zeros(0, np.int64)
    stored = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32, "F64": np.float64}[emb_dtype]
    V = np.empty((val_rows.size, H), dtype=stored)
    fast = emb_dtype == "BF16" and solver_used == "mixed" and _bf16_gemm_kernel() is not None
    if gram == "bf16" and not fast:
        why = "the embeddings are not bf16" if emb_dtype != "BF16" else \
            "it needs the mixed solver (scipy)" if solver_used != "mixed" else "this CPU has no AVX512_BF16"
        raise ValueError(f"gram='bf16' is not available: {why}; use gram='auto' or 'float64'")
    fast = fast and gram != "float64"
    t_read = time.perf_counter()
    notes: Dict[str, int] = {}

    scratch = _Scratch()  # factors and row buffers, reused

    def release(g: _Group) -> None:
        if g.solver is not None:
            g.solver.release()
        g.A = g.B = g.solver = None

    with _blas_pool(max_workers) as pool:
        threads = _pool_size(max_workers)  # the core's GEMM threads
        solve_threads = threads if pool is not None else 1  # factorizations at once (one-thread BLAS each)

        def accumulate(sel: List[_Group], mode: str, first: bool) -> None:
            """One streaming pass: X^T X and X^T Y of `sel`'s primal groups, rows of its dual groups, and
            (`first`) the validation rows."""
            work = scratch.get((H, H), np.float32) if mode == "bf16" else scratch.get((4096, H), np.float64)
            grams = [_Gram(H, len(g.objectives), g.train_rows.size, mode, emb_dtype, pool, threads, work, scratch)
                     if g.form == "primal" else None for g in sel]
            for g in sel:
                if g.form == "dual":
                    g.A = np.empty((g.train_rows.size, H), dtype=np.float64)
            bar = _Progress(progress if progress is not None and first else False, N, 0,
                            desc="accumulating X^T X", unit="row")
            try:
                sets = [g.train_rows for g in sel] + ([val_rows] if first else [])
                for st, raw, ga, spans in _stream(files, offsets, chunk_rows, sets, bar, first, scratch):
                    for g, gr, (lo, hi) in zip(sel, grams, spans):
                        if hi > lo:
                            rows = raw[g.train_rows[lo:hi] - ga]
                            if gr is None:
                                _decode_into(rows, st, g.A[lo:hi])
                            else:
                                gr.add(rows, st, g.Ytr[lo:hi])
                    if first and spans[-1][1] > spans[-1][0]:
                        vlo, vhi = spans[-1]
                        rows_v = raw[val_rows[vlo:vhi] - ga]
                        V[vlo:vhi] = rows_v if st == emb_dtype else to_float(rows_v, st, stored)
            finally:
                bar.close()
            for g, gr in zip(sel, grams):
                g.gram = "float64" if gr is None else mode
                if gr is not None:
                    g.A, g.B = gr.finish()
            scratch.put(work)

        def solve(sel: List[_Group]) -> None:
            """Every alpha's solution for `sel`: primal (X^T X + a I) W = X^T Y; dual (X X^T + a I) C = Y,
            W = X^T C."""
            def system(g: _Group) -> Tuple[np.ndarray, np.ndarray]:
                return (g.A, g.B) if g.form == "primal" else (g.A @ g.A.T, g.Ytr)

            per_alpha = solver_used in ("cholesky", "lu")  # one factorization per alpha: independent tasks
            tasks = [(i, [a]) for i in range(len(sel)) for a in alphas] if per_alpha else \
                [(i, alphas) for i in range(len(sel))]
            solved = _pool_map(pool, lambda t: _solve_all_alphas(*system(sel[t[0]]), t[1], solver_used,
                                                                 solve_threads, scratch), tasks)
            for _, info, _ in solved:
                for key, v in info.items():
                    notes[key] = notes.get(key, 0) + v
            for i, g in enumerate(sel):
                W = [w for (j, _), (ws, _, _) in zip(tasks, solved) if j == i for w in ws]
                g.W = W if g.form == "primal" else [g.A.T @ c for c in W]
                g.solver = next((ms for (j, _), (_, _, ms) in zip(tasks, solved) if j == i), None)
                if g.gram != "bf16":
                    release(g)  # only bf16-gram solutions get corrected

        accumulate(groups, "bf16" if fast else "float64", first=True)
        t_acc = time.perf_counter()
        solve(groups)
        t_solve = time.perf_counter()

        # ---- bf16 X^T X: correct the solutions against the exact rows (float64 residuals) ---------------
        # W += (X~^T X~ + a I)^-1 (X^T (Y - X W) - a W), one pass over the files each: the error shrinks by
        # about the relative error that X~^T X~ caused. Done when the estimated remaining change is below
        # _REFINE_TOL; a mask whose corrections do not shrink fast is accumulated again in float64.
        pending = [g for g in groups if g.gram == "bf16"]
        while pending:
            residuals = _exact_residuals(files, offsets, chunk_rows, pending, alphas, pool, scratch)

            def correct(t: Tuple[_Group, List[np.ndarray]]) -> Optional[List[np.ndarray]]:
                if t[0].solver is None:  # solved by the eigendecomposition: no factors to correct with
                    return None
                try:
                    return t[0].solver.solve(t[1], tol=1e-6)
                except np.linalg.LinAlgError:
                    return None

            again, redo = [], []
            for g, D in zip(pending, _pool_map(pool, correct, list(zip(pending, residuals)))):
                if D is None:
                    redo.append(g)
                    continue
                g.W = [w + d for w, d in zip(g.W, D)]
                g.changes.append(max(_col_change(d, w) for w, d in zip(g.W, D)))
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
                    release(g)
            if redo:  # too far from float64 for refinement: X^T X again, exactly
                for g in redo:
                    g.fallback = True
                accumulate(redo, "float64", first=False)
                solve(redo)
            pending = again
    t_refine = time.perf_counter()
    for g in groups:
        W_all = np.concatenate(g.W, axis=1)  # [H, n_alpha * k]
        kk = len(g.objectives)
        Yv = Y[g.val_rows][:, g.objectives].astype(np.float64)
        sse = np.zeros(W_all.shape[1])
        pos = np.searchsorted(val_rows, g.val_rows)
        Xv = scratch.get((chunk_rows, H), np.float64)
        for s in range(0, pos.size, chunk_rows):
            n = min(chunk_rows, pos.size - s)
            _decode_into(V[pos[s:s + n]], emb_dtype, Xv[:n])
            R = Xv[:n] @ W_all - np.tile(Yv[s:s + n], (1, len(alphas)))
            sse += np.einsum("ij,ij->j", R, R)
        g.mse = (sse / g.val_rows.size).reshape(len(alphas), kk)
        scratch.put(Xv)
    scratch = None  # free
    t_val = time.perf_counter()

    weight = np.zeros((K, H), dtype=np.float32)
    for gi, g in enumerate(groups):
        for j, k in enumerate(g.objectives):
            col = np.where(np.isnan(g.mse[:, j]), np.inf, g.mse[:, j])
            if not np.isfinite(col).any():
                raise ValueError(f"objective {names[k]}: every alpha gave a non-finite validation MSE")
            best = int(np.argmin(col))  # first minimum: the smaller alpha on ties, as pandas' idxmin
            weight[k] = g.W[best][:, j].astype(np.float32)
            entries[k].update(alpha=alphas[best], val_mse=float(g.mse[best, j]), form=g.form, group=gi,
                              val_mse_by_alpha=[float(v) for v in g.mse[:, j]])
    t_end = time.perf_counter()
    rep: Dict[str, Any] = {
        "files": paths, "rows": N, "train_rows": int(N - test_idx.size), "val_rows": int(test_idx.size),
        "hidden_size": int(H), "alphas": alphas, "val_fraction": float(val_fraction), "seed": seed,
        "solver": "+".join(sorted(k for k in notes if " " not in k)) or solver_used,
        "solver_work": {k: v for k, v in notes.items() if " " in k},
        "groups": [{"objectives": [names[k] for k in g.objectives], "form": g.form,
                    "train_count": int(g.train_rows.size), "val_count": int(g.val_rows.size),
                    "gram": "bf16, refined" if g.changes and not g.fallback else
                    "float64 (bf16 refinement too slow)" if g.fallback else "float64",
                    **({"exact_passes": len(g.changes), "corrections": g.changes,
                        "estimated_rel_error": g.est_error} if g.changes and not g.fallback else {})}
                   for g in groups],
        "objectives": entries, "warnings": report_warnings,
        "timings_s": {"read_labels": t_read - t0, "accumulate": t_acc - t_read, "solve": t_solve - t_acc,
                      "refine": t_refine - t_solve, "validate": t_val - t_refine, "total": t_end - t0},
    }
    result = Stage1Result(weight, names, rep)
    if output is not None:
        output = os.fspath(output)
        d = os.path.dirname(os.path.abspath(output))
        os.makedirs(d, exist_ok=True)
        save_file({"regression_layer.weight": weight}, output,
                  metadata={"format": "pt", "objectives": json.dumps(names),
                            "alphas": json.dumps([e.get("alpha") for e in entries])})
        report = report if report is not None else os.path.splitext(output)[0] + ".json"
        result.output = output
    if report is not None:
        report = os.fspath(report)
        _write_json_atomic(report, rep)
        result.report_path = report
    if not quiet:
        print(result.table())
    return result
