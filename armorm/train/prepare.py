"""Sharded, resumable embedding of a dataset with a frozen backbone: the loop every preparation shares.

A preparation turns one shard of a dataset into one safetensors file,
`<output>/<name>-<shard:05d>-of-<n_shards:05d>.safetensors` (the reference's
naming; `<name>` defaults to the dataset's last path component). What is
embedded and written is a `Kind`'s: stage 1's conversations and labels
(`stage1.prepare`), stage 2's preference pairs (`stage2.prepare`), RewardBench
2's N completions per prompt (`rewardbench2.prepare`).

Rows: the dataset is shuffled with `numpy.random.default_rng(seed)
.permutation(N)` (seed 0), which is exactly what `datasets.Dataset.shuffle(
seed=0)` does (`seed=None` keeps the order), then sharded as
`datasets.Dataset.shard`: `shard_mode="contiguous"` (datasets >= 3.1, the
default) or `"strided"` (rows i, i+n, i+2n, ...: datasets < 3.1, which the
2024 ArmoRM release ran with). Shard indices are 1-based, as the reference's
`--shard_idx`.

Resuming: rows are processed in chunks of `chunk_rows`; each finished chunk
is written (atomically) to a hidden work directory next to the output,
`.<file>.partial/`, recording how many dataset rows it covers. Running the
same command again skips finished chunks. The final file is written to a
temporary name and renamed, so it only ever appears complete; the work
directory is then removed. Changing settings that affect the result (model,
dataset, seed, shards, dtypes, chunk_rows, the kind's own) makes a resume
refuse with a clear error (`restart=True` starts over). `batch_tokens` and
threads can change between runs: a row's embedding does not depend on what
it was batched with.

The work of one chunk is `embed_chunk(kind, model, records, wheres, rows)`:
a function of the loaded backbone and the chunk's records alone, so a
distributed runner (Ray) can run chunks on other machines and write what
they return as the chunk files `run` assembles.
"""
from __future__ import annotations

import glob as _glob
import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..atomic import write_json_atomic
from ..data import DatasetError, open_dataset
from ..progress import Progress, ProgressArg
from ..safetensors_io import SafetensorsFile, save_file

#: Stored embedding dtypes by the names `embeddings_dtype` accepts.
EMBEDDING_DTYPES = {"bfloat16": "BF16", "bf16": "BF16", "float32": "F32", "fp32": "F32"}

#: `progress(rows, tokens)`: what a kind reports as it embeds (rows of the dataset, tokens run).
Report = Callable[[int, int], None]


def log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr)


def resolve_embeddings_dtype(name: Any) -> Tuple[str, str]:
    """(safetensors dtype, canonical name) of an `embeddings_dtype` argument."""
    st = EMBEDDING_DTYPES.get(str(name).replace("torch.", "").lower())
    if st is None:
        raise ValueError(f"embeddings_dtype must be 'bfloat16' or 'float32', got {name!r}")
    return st, "bfloat16" if st == "BF16" else "float32"


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


# =========================================================================== the backbone and its input


def model_fingerprint(model: Any, torch_dtype: Any) -> Dict[str, Any]:
    """What identifies the backbone for resuming: its path, config hash, weight bytes and dtype."""
    path = getattr(model, "name_or_path", str(model))
    fp: Dict[str, Any] = {"path": os.path.abspath(path)}
    cfg = os.path.join(path, "config.json")
    if os.path.isfile(cfg):
        with open(cfg, "rb") as f:
            fp["config_sha256"] = hashlib.sha256(f.read()).hexdigest()
        fp["weights_bytes"] = sum(os.path.getsize(p) for p in _glob.glob(os.path.join(path, "*.safetensors")))
    fp["dtype"] = str(torch_dtype) if isinstance(model, (str, os.PathLike)) else getattr(model, "dtype", None)
    return fp


def load_backbone(model: Any, torch_dtype: str, num_threads: Optional[int], batch_tokens: int,
                  check_finite: bool = True) -> Any:
    """The backbone of a model directory (any architecture, heads not computed), or a loaded `ArmoRM` as is."""
    from ..model import PREPACK_FOR_BATCH_JOBS, ArmoRM
    if isinstance(model, ArmoRM):
        return model
    return ArmoRM.from_pretrained(model, architecture="LlamaModel", torch_dtype=torch_dtype,
                                  num_threads=num_threads, max_batch_tokens=batch_tokens, check_finite=check_finite,
                                  prepack=PREPACK_FOR_BATCH_JOBS)


def tokenize(tok: Any, convs: List[List[Dict[str, Any]]], wheres: List[str]) -> List[np.ndarray]:
    """Chat template + tokenization with exactly one BOS, each conversation named by `wheres[i]` in errors.

    The Llama-3 template writes `<|begin_of_text|>` itself and is tokenized
    without special tokens; a doubled BOS is an error; a template without BOS
    gets the tokenizer's own when it adds one (as the reference gets).
    """
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
                s = [bos] + list(s)
        if not s:
            raise DatasetError(f"{where}: the formatted conversation has no tokens")
        out.append(np.asarray(s, dtype=np.int32))
    return out


def check_lengths(model: Any, seqs: Sequence[np.ndarray], wheres: Sequence[str], hint: str = "") -> None:
    """A DatasetError naming the first sequence longer than the model's max_position_embeddings."""
    max_pos = model.config.max_position_embeddings
    for s, where in zip(seqs, wheres):
        if s.size > max_pos:
            raise DatasetError(f"{where}: the conversation has {s.size} tokens; the model allows at most "
                               f"{max_pos} (max_position_embeddings){hint}")


def embed_sequences(model: Any, seqs: Sequence[np.ndarray], fields: Sequence[str], batch_tokens: int,
                    report: Optional[Callable[[int, int], None]] = None) -> Dict[str, np.ndarray]:
    """The backbone's `fields` (float32) for token sequences, packed; `report(sequences, tokens)` per batch."""
    cum = np.cumsum([s.size for s in seqs])
    state = {"n": 0}

    def on_batch(n_done: int, _total: int) -> None:
        prev = state["n"]
        state["n"] = n_done
        if report is not None:
            report(n_done - prev, int(cum[n_done - 1] - (cum[prev - 1] if prev else 0)))

    out = model.score_sequences(seqs, fields=list(fields), batch_tokens=batch_tokens, progress=on_batch)
    return {f: np.asarray(out[f], dtype=np.float32) for f in fields}


# =========================================================================== kinds of preparation


@dataclass
class Chunk:
    """What one chunk of rows becomes: tensors (embeddings in the run's stored dtype) and metadata."""

    tensors: Dict[str, Any]
    metadata: Dict[str, str] = field(default_factory=dict)


class Kind:
    """What a preparation embeds and writes. Subclasses set the attributes and the three steps."""

    #: what the error messages call the preparation ("stage 1") and the CLI command ("prepare-stage1")
    title = "preparation"
    command = "prepare"
    #: metadata key of the settings in the final file, and the settings' format version
    meta_key = "armorm_prepare"
    version = 1
    #: dataset columns read, those that must exist (checked when the source has a schema), and why
    columns: Sequence[str] = ()
    required: Sequence[str] = ()
    missing_hint = ""
    #: the progress bar's unit, and the tensors stored in the run's embeddings dtype
    unit = "row"
    embedding_tensors: Sequence[str] = ("embeddings",)

    def settings(self) -> Dict[str, Any]:
        """The kind's own settings that the result depends on (compared when resuming)."""
        return {}

    def check(self, src: Any, rows: np.ndarray) -> None:
        """Checks across chunks (ids given twice, ...) of the shard's `rows` of `src`, run before any chunk is
        embedded; a DatasetError naming the row. Default: none (`parse` checks each chunk)."""

    def parse(self, records: List[Dict[str, Any]], wheres: List[str]) -> Any:
        """A chunk's records -> the work to embed; a DatasetError naming the row (before the model loads)."""
        raise NotImplementedError

    def embed(self, model: Any, work: Any, rows: np.ndarray, batch_tokens: int, report: Report) -> Chunk:
        """Runs the work through the backbone; `rows` are the chunk's dataset rows. `report(rows, tokens)`
        as batches finish (rows not reported are counted once the chunk is saved)."""
        raise NotImplementedError

    def assemble(self, chunks: List[SafetensorsFile], final: str, metadata: Dict[str, str], st_dtype: str,
                 rows: int) -> List[str]:
        """Streams the chunk files into `final` with `metadata`; returns what to tell the user (warnings, a
        summary line)."""
        raise NotImplementedError


def embed_chunk(kind: Kind, model: Any, records: List[Dict[str, Any]], wheres: List[str], rows: np.ndarray,
                batch_tokens: int = 8192, report: Optional[Report] = None) -> Chunk:
    """The whole work of one chunk: parse its records, embed them with a loaded backbone."""
    return kind.embed(model, kind.parse(records, wheres), rows, batch_tokens, report or (lambda n, t: None))


# =========================================================================== finished output, work directory


def _read_json(path: str) -> Any:
    with open(path, "r", encoding="utf-8") as f:
        return json.load(f)


def _diff(a: Dict[str, Any], b: Dict[str, Any]) -> str:
    keys = sorted(set(a) | set(b))
    return ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys if a.get(k) != b.get(k))


def _already_done(final: str, settings: Dict[str, Any], kind: Kind, overwrite: bool, quiet: bool) -> bool:
    """True when `final` exists and was written with `settings` (kept unless `overwrite`).

    Raises ValueError when it exists with other settings and `overwrite` is False.
    """
    if not os.path.exists(final):
        return False
    try:
        old = json.loads(SafetensorsFile(final).metadata.get(kind.meta_key, "null"))
    except ValueError:
        old = None
    if overwrite:
        return False
    if old == settings:
        log(f"{final} is already complete", quiet)
        return True
    why = _diff(old, settings) if isinstance(old, dict) else f"it was not written by armorm {kind.command}"
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
        write_json_atomic(meta_path, work_settings)
    return work


def _chunk_path(work: str, c: int) -> str:
    return os.path.join(work, f"chunk-{c:06d}.safetensors")


def _chunk_done(path: str, rows_in: int) -> bool:
    """A finished chunk: a readable file covering `rows_in` dataset rows (chunks are written atomically)."""
    try:
        return int(SafetensorsFile(path).metadata.get("rows_in", -1)) == rows_in
    except (OSError, ValueError):
        return False


# =========================================================================== the loop


def run(kind: Kind, model: Any, dataset: Any, output: Any, *, n_shards: int = 1, shard_idx: int = 1,
        split: str = "train", name: Optional[str] = None, batch_tokens: int = 8192,
        embeddings_dtype: str = "bfloat16", torch_dtype: str = "bfloat16", seed: Optional[int] = 0,
        shard_mode: str = "contiguous", chunk_rows: int = 1024, num_threads: Optional[int] = None,
        progress: ProgressArg = None, overwrite: bool = False, restart: bool = False, quiet: bool = False,
        check_finite: bool = True) -> str:
    """Writes one shard of `kind`'s embeddings (see the module docstring); returns the file's path.

    `progress`: None (a bar when stderr is a terminal), True/False, or a
    callable `(rows_done, rows_total, tokens_done)` called after each packed
    batch.
    """
    st_dtype, dtype_name = resolve_embeddings_dtype(embeddings_dtype)
    if chunk_rows < 1:
        raise ValueError("chunk_rows must be >= 1")
    if batch_tokens < 1:
        raise ValueError("batch_tokens must be >= 1")
    src = open_dataset(dataset, split=split, columns=list(kind.columns))
    cols = src.columns()
    if cols is not None:
        missing = [c for c in kind.required if c not in cols]
        if missing:
            raise DatasetError(f"{src.location}: the dataset has no column(s) {', '.join(missing)} "
                               f"(it has {', '.join(cols)}); {kind.missing_hint}")
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
    settings = {"version": kind.version, "model": model_fingerprint(model, torch_dtype),
                "dataset": src.fingerprint(), "split": split, "seed": seed, "n_shards": n_shards,
                "shard_idx": shard_idx, "shard_mode": shard_mode, **kind.settings(),
                "embeddings_dtype": dtype_name, "rows": int(rows.size)}
    settings = json.loads(json.dumps(settings))  # normalized (tuples -> lists) for comparisons
    if _already_done(final, settings, kind, overwrite, quiet):
        return final
    kind.check(src, rows)
    work = _work_dir(output, final, settings, chunk_rows, restart)

    n_chunks = -(-rows.size // chunk_rows)
    bounds = [(c * chunk_rows, min(rows.size, (c + 1) * chunk_rows)) for c in range(n_chunks)]
    done = {c for c, (a, b) in enumerate(bounds) if _chunk_done(_chunk_path(work, c), b - a)}
    todo = [c for c in range(n_chunks) if c not in done]
    if done:
        log(f"resuming: {len(done)} of {n_chunks} chunks already done in {work}", quiet)
    if todo:
        backbone = None
        try:
            done_rows = sum(bounds[c][1] - bounds[c][0] for c in done)
            with Progress(int(rows.size), show=progress, initial=done_rows,
                          desc=f"embedding {os.path.basename(final)}", unit=kind.unit) as bar:
                for c in todo:
                    a, b = bounds[c]
                    idx = rows[a:b]
                    wheres = [src.where(int(r)) for r in idx]
                    work_items = kind.parse(src.take(idx), wheres)
                    if backbone is None:  # loaded once the first rows are known to be good
                        backbone = load_backbone(model, torch_dtype, num_threads, batch_tokens, check_finite)
                        if backbone.tokenizer is None:
                            raise ValueError(f"{backbone.name_or_path} has no tokenizer (tokenizer.json); "
                                             f"{kind.title} formats conversations with the model's chat template")
                    before = bar.done
                    chunk = kind.embed(backbone, work_items, idx, batch_tokens, bar.update)
                    save_file(chunk.tensors, _chunk_path(work, c),
                              metadata=dict(chunk.metadata, rows_in=str(b - a)),
                              dtypes={t: st_dtype for t in kind.embedding_tensors})
                    bar.update(max(0, (b - a) - (bar.done - before)))  # rows a kind does not report as it goes
        finally:
            if backbone is not None and backbone is not model:  # loaded here: unmapped now, even on Ctrl-C
                backbone.close()
    chunks = [SafetensorsFile(_chunk_path(work, c)) for c in range(n_chunks)]
    meta = {"format": "pt", kind.meta_key: json.dumps(settings)}
    notes = kind.assemble(chunks, final, meta, st_dtype, int(rows.size))
    shutil.rmtree(work, ignore_errors=True)
    for line in notes:
        log(line, quiet)
    return final
