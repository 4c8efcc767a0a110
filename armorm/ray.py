"""Scale out on Ray Data: score and embed datasets across the machines of a Ray cluster.

    import ray, armorm.ray
    ds = ray.data.read_parquet("s3://bucket/pairs/")
    scored = armorm.ray.score_dataset(ds, "/models/ArmoRM-Llama3-8B-v0.1", actors=8, device="cuda")
    scored.write_parquet("s3://bucket/scores/")

Ray Data does the scheduling: `Dataset.map_batches` with a callable class
(`Scorer`, `Embedder`), so the model loads once per actor; a fixed pool of
`actors` actors (`ray.data.ActorPoolStrategy(size=actors)`), each reserving
`threads_per_actor` CPUs (the core's threads) and, with `device="cuda"`, one
GPU. Each batch of rows is tokenized and scored in one packed
`score_sequences` call inside the actor, so packing and the sharing of
common prompt prefixes between responses apply as on one machine; a row's
result never depends on the rows it is batched with, so on the CPU any
number of actors gives the single-process results bit for bit.

Fault tolerance is Ray Data's: its actor pools are created with
`max_restarts=-1` and `max_task_retries=-1`, so an actor that dies (killed,
out of memory, its node lost) is restarted, loads the model again, and the
batch it held is run again; no row is lost or written twice. A row that is
wrong (no final assistant turn, a missing column, ...) is an error that
names the row's id and stops the run; it is not retried.

The command line (`armorm score --ray`, `armorm prepare-stage1 --ray`,
`armorm prepare-stage2 --ray`) is built on the same classes; see
docs/ray.md for the design and its guarantees.
"""
from __future__ import annotations

import glob as _glob
import json
import os
import shutil
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .data import ListSource
from .model import PREPACK_FOR_BATCH_JOBS, ArmoRM, RewardOutput

try:
    import pyarrow as pa
    import ray
    import ray.data
    from ray.data.datasource import BlockBasedFileDatasink
except ImportError as _e:  # pragma: no cover - depends on the environment
    raise ImportError(f"armorm.ray needs Ray Data: pip install 'armorm[ray]' ({_e})") from None

MIN_RAY = (2, 50)
if tuple(int(p) for p in ray.__version__.split(".")[:2] if p.isdigit()) < MIN_RAY:  # pragma: no cover
    raise ImportError(f"armorm.ray needs ray >= {'.'.join(map(str, MIN_RAY))}, this is ray {ray.__version__}: "
                      "pip install 'armorm[ray]'")

#: Rows per map_batches call: one packed scoring call per batch; a dead actor's batch is redone whole.
DEFAULT_BATCH_ROWS = 256
FORMATS = ("parquet", "jsonl")
TOP_OBJECTIVES = pa.list_(pa.struct([("objective", pa.string()), ("coefficient", pa.float32())]))


class RowError(ValueError):
    """A bad input row; the message starts with the row's id ("row id=7: ...")."""


def row_label(row_id: Any) -> str:
    """How errors name a row: `row id=<id>`."""
    return f"row id={row_id!r}"


def _rows(batch: Any, id_column: str) -> Tuple[List[Dict[str, Any]], List[str], Any]:
    """A map_batches batch (pyarrow Table, pandas DataFrame or dict of columns): its rows as dicts, its
    column names and its id column (as given, so its type is kept)."""
    if isinstance(batch, pa.Table):
        rows, columns = batch.to_pylist(), batch.column_names
    elif hasattr(batch, "to_dict") and hasattr(batch, "columns"):  # pandas
        rows, columns = batch.to_dict("records"), list(batch.columns)
    else:
        columns = list(batch)
        n = len(batch[columns[0]]) if columns else 0
        rows = [{k: batch[k][i] for k in columns} for i in range(n)]
    if id_column not in columns:
        raise RowError(f"the rows have no {id_column!r} column; give every row an id "
                       "(armorm.ray.add_row_ids(ds) numbers them in input order)")
    ids = batch[id_column]
    return rows, columns, ids if isinstance(ids, (pa.Array, pa.ChunkedArray)) else pa.array(list(ids))


def _present(rec: Dict[str, Any]) -> Dict[str, Any]:
    """The row without null fields: a column the file lacks for this row is as good as absent."""
    return {k: v for k, v in rec.items() if v is not None}


def _default_threads() -> Optional[int]:
    """Inside a Ray actor: the CPUs Ray assigned to it (the process may see the whole machine)."""
    try:
        if ray.is_initialized():
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
            if cpus:
                return max(1, int(cpus))
    except Exception:  # not in a worker, or an older runtime context
        pass
    return None


def _device_map(device: str) -> str:
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    return device


def _objective_names(model: Any, k: int) -> List[str]:
    names = list(model.attributes)
    return names if len(names) == k else [f"objective-{i}" for i in range(k)]


# =========================================================================== scoring


class Scorer:
    """A `map_batches` callable class that scores conversations with a reward model.

    Constructed once per actor (the model is loaded there, with `num_threads`
    core threads: by default the CPUs Ray reserved for the actor; `device`
    "cpu" or "cuda"). Each call takes a batch of rows (use
    `batch_format="pyarrow"`) with an id column (`id_column`, default "id")
    and one of: `messages` (a chat ending with an assistant message),
    `prompt` + `response` strings, or a preference pair `chosen` /
    `rejected` (message lists, or response strings with `prompt`). It
    returns a pyarrow Table, one row per input row in the same order:

    - the id, then `score` (float32);
    - ArmoRM models: `rewards` and `gating_output`, structs with one float32
      field per objective (named as `ArmoRM.attributes`), and, when
      `top_k` > 0, `top_objectives`, a list of {objective, coefficient};
    - pairs: the same fields with `chosen_` and `rejected_` prefixes.

    A bad row raises RowError naming its id.
    """

    def __init__(self, model: Union[str, os.PathLike], *, device: str = "cpu", num_threads: Optional[int] = None,
                 dtype: str = "bfloat16", max_length: int = 4096, truncation: bool = True, batch_tokens: int = 8192,
                 top_k: int = 3, id_column: str = "id", check_finite: bool = True) -> None:
        from .pipeline import ArmoRMPipeline
        self.pipeline = ArmoRMPipeline(model, device_map=_device_map(device), torch_dtype=dtype,
                                       max_length=max_length, truncation=truncation, batch_tokens=batch_tokens,
                                       num_threads=num_threads or _default_threads(), check_finite=check_finite,
                                       prepack=PREPACK_FOR_BATCH_JOBS)
        self.model = self.pipeline.model
        if self.model.config.kind not in ("armorm", "seqcls") or not self.model.config.core["compute_head"]:
            raise ValueError(f"{model}: this checkpoint has no reward head ({self.model.architecture})")
        self.gated = self.model.config.kind == "armorm"
        self.fields = ["score", "rewards", "gating_output"] if self.gated else ["score"]
        self.top_k = int(top_k) if self.gated else 0
        self.id_column = id_column
        self.objectives = _objective_names(self.model, self.model.config.num_objectives) if self.gated else []

    def _conversations(self, rec: Dict[str, Any], where: str, pairs: bool) -> List[List[Dict[str, Any]]]:
        from .tokenizer import conversation_from_record
        from .train.stage2 import pair_conversations
        rec = _present(rec)
        try:
            if pairs:
                return list(pair_conversations(rec, where))
            return [conversation_from_record(rec)]
        except ValueError as e:
            msg = str(e)
            raise RowError(msg if msg.startswith(where) else f"{where}: {msg}") from None

    def __call__(self, batch: Any) -> "pa.Table":
        rows, columns, ids = _rows(batch, self.id_column)
        pairs = "chosen" in columns or "rejected" in columns
        prefixes = ["chosen_", "rejected_"] if pairs else [""]
        convs, names = [], []
        for rec in rows:
            where = row_label(rec[self.id_column])
            convs += self._conversations(rec, where, pairs)
            names += [f"{where} ({s})" for s in ("chosen", "rejected")] if pairs else [where]
        out: Dict[str, np.ndarray] = {}
        if convs:
            try:
                seqs = self.pipeline.encode(convs, names=names)
                out = dict(self.model.score_sequences(seqs, fields=self.fields, names=names))
            except ValueError as e:  # the messages name the row (and side)
                raise RowError(str(e)) from None
        cols: Dict[str, Any] = {self.id_column: ids}
        for i, p in enumerate(prefixes):
            side = {f: v[i::len(prefixes)] for f, v in out.items()}  # pairs: chosen, rejected interleaved
            cols.update(self._columns(p, side, len(rows)))
        return pa.table(cols)

    def _columns(self, prefix: str, out: Dict[str, np.ndarray], n: int) -> Dict[str, Any]:
        """One side's output columns: score, then (ArmoRM) rewards, gating_output, top_objectives."""
        K = len(self.objectives)

        def arr(f: str, shape: Tuple[int, ...]) -> np.ndarray:  # an empty batch has no outputs
            return np.asarray(out[f], dtype=np.float32) if f in out else np.zeros(shape, np.float32)
        cols: Dict[str, Any] = {prefix + "score": pa.array(arr("score", (n,)), type=pa.float32())}
        if not self.gated:
            return cols
        fields = [pa.field(a, pa.float32()) for a in self.objectives]
        for f in ("rewards", "gating_output"):
            v = arr(f, (n, K))
            cols[prefix + f] = pa.StructArray.from_arrays([pa.array(v[:, j]) for j in range(K)], fields=fields)
        if self.top_k > 0:
            top = self.model.explain({"gating_output": arr("gating_output", (n, K))}, self.top_k) if n else []
            cols[prefix + "top_objectives"] = pa.array(
                [[{"objective": a, "coefficient": c} for a, c in row] for row in top], type=TOP_OBJECTIVES)
        return cols


def score_dataset(ds: "ray.data.Dataset", model: Union[str, os.PathLike], *, actors: int = 1,
                  threads_per_actor: int = 1, device: str = "cpu", batch_rows: int = DEFAULT_BATCH_ROWS,
                  scorer: type = Scorer, **scorer_kwargs: Any) -> "ray.data.Dataset":
    """`ds.map_batches(Scorer, ...)` on a pool of `actors` actors; returns the scored Dataset (lazy).

    Each actor reserves `threads_per_actor` CPUs (the core's threads) and,
    with `device="cuda"`, one GPU. `scorer_kwargs` go to `Scorer` (dtype,
    max_length, truncation, batch_tokens, top_k, id_column, check_finite);
    `scorer` may be a subclass of it (to add columns, say). Output rows come
    in input order (the dataset's `execution_options.preserve_order` is set);
    a bad row raises RowError (a ValueError) naming its id.
    """
    return _map(ds, scorer, dict(model=os.fspath(model), device=device, num_threads=threads_per_actor,
                                 **scorer_kwargs), actors, threads_per_actor, device, batch_rows)


def _map(ds: "ray.data.Dataset", cls: type, kwargs: Dict[str, Any], actors: int, threads_per_actor: int,
         device: str, batch_rows: int) -> "ray.data.Dataset":
    """The one map_batches call every armorm path makes: a fixed actor pool, CPUs (and a GPU) per actor."""
    if actors < 1 or threads_per_actor < 1 or batch_rows < 1:
        raise ValueError("actors, threads_per_actor and batch_rows must be >= 1")
    _device_map(device)
    ds.context.execution_options.preserve_order = True
    ds.context.raise_original_map_exception = True  # callers can catch RowError (a ValueError)
    # blocks of at most one batch: a file read as one big block would otherwise go to one actor
    ds = ds.repartition(target_num_rows_per_block=batch_rows)
    # Ray's default tasks in flight per actor: max_tasks_in_flight_per_actor=1 balanced short jobs better
    # (benchmarks/ray_overhead.py) but, in Ray 2.60, twice let the written files come out of row order
    pool = ray.data.ActorPoolStrategy(size=actors)
    out = ds.map_batches(cls, fn_constructor_kwargs=kwargs, batch_size=batch_rows, batch_format="pyarrow",
                         compute=pool, num_cpus=threads_per_actor,
                         num_gpus=1 if device.startswith("cuda") else None)
    out.context.execution_options.preserve_order = True
    return out


@ray.remote
def _num_rows(block: "pa.Table") -> int:
    return block.num_rows


@ray.remote
def _with_row_ids(block: "pa.Table", first: int, column: str) -> "pa.Table":
    return block.add_column(0, column, pa.array(np.arange(first, first + block.num_rows, dtype=np.int64)))


def add_row_ids(ds: "ray.data.Dataset", column: str = "id") -> "ray.data.Dataset":
    """`ds` with a `column` of int64 row numbers in input order (0, 1, ...), for rows that carry no id.

    The input is materialized (in Ray's object store, spilled to disk when
    large), its blocks counted, and each block numbered from its offset.
    (`Dataset.zip` with `ray.data.range` would avoid the materialization, but
    it is deprecated and goes in Ray 2.64.)
    """
    if column in (ds.schema().names if ds.schema() is not None else []):
        raise ValueError(f"the dataset already has a {column!r} column")
    ds.context.execution_options.preserve_order = True
    refs = ds.materialize().to_arrow_refs()  # the blocks, in order
    counts = ray.get([_num_rows.remote(r) for r in refs])
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    out = ray.data.from_arrow_refs([_with_row_ids.remote(r, int(o), column) for r, o in zip(refs, offsets)])
    out.context.execution_options.preserve_order = True
    return out


# =========================================================================== stage-1/2 embedding
#
# The single-machine preparation (`armorm.train.stage1.prepare`, `stage2.prepare`) stays the one place that
# reads, shuffles, shards, validates, tokenizes, chunks and writes: on the driver it runs with a backbone
# (`_RayBackbone`) whose forward passes come from a Ray Data job, `Embedder` actors that embed whole
# chunks of the same rows (each chunk through the same public `prepare` on that chunk's records). Until
# the preparation loop exposes its per-chunk work, this is the adapter between the two (docs/ray.md).


class _ChunkSource(ListSource):
    """The records of one chunk, named in errors as in the whole dataset ("file.jsonl:12")."""

    def __init__(self, records: List[Dict[str, Any]], wheres: List[str]) -> None:
        super().__init__(records, "chunk", "<chunk>")
        self._wheres = wheres

    def where(self, row: int) -> str:
        return self._wheres[int(row)]


def _stage_module(stage: int) -> Any:
    if stage == 1:
        from .train import stage1
        return stage1
    if stage == 2:
        from .train import stage2
        return stage2
    raise ValueError(f"stage must be 1 or 2, got {stage!r}")


class Embedder:
    """A `map_batches` callable class that embeds chunks of dataset rows for stage 1 or stage 2.

    Constructed once per actor: loads the backbone (`model`, weights in
    `torch_dtype`, `num_threads` threads, `device`) and opens `dataset`
    (which every node must reach at the same path, or a hub id). Each input
    row is a chunk, {"chunk": c, "rows": [dataset row indices]}; each output
    row holds, for the chunk's sequences in the order the preparation runs
    them, `hidden_state` and (stage 2) `prompt_embedding` as float32 bytes
    [n, H], with `n` and `hidden` (stage 1: one sequence per row; stage 2:
    chosen then rejected of each pair short enough for `seq_len`). A bad
    row raises the preparation's DatasetError naming it ("file.jsonl:12").
    """

    def __init__(self, model: str, dataset: Any, *, stage: int, split: str = "train",
                 objectives: Optional[Sequence[str]] = None, seq_len: int = 8192, torch_dtype: str = "bfloat16",
                 batch_tokens: int = 8192, num_threads: Optional[int] = None, device: str = "cpu",
                 check_finite: bool = True) -> None:
        from .data import open_dataset
        self.stage = _stage_module(stage)
        self.options = dict(objectives=objectives) if stage == 1 else dict(seq_len=seq_len)
        self.batch_tokens = batch_tokens
        self.source = open_dataset(dataset, split=split)
        self.backbone = ArmoRM.from_pretrained(model, architecture="LlamaModel", torch_dtype=torch_dtype,
                                               device_map=_device_map(device), max_batch_tokens=batch_tokens,
                                               num_threads=num_threads or _default_threads(),
                                               check_finite=check_finite, prepack=PREPACK_FOR_BATCH_JOBS)

    def __call__(self, batch: Any) -> "pa.Table":
        import tempfile
        from .safetensors_io import SafetensorsFile
        chunks, rows = batch["chunk"].to_pylist(), batch["rows"].to_pylist()
        out: Dict[str, List[Any]] = {"chunk": [], "n": [], "hidden": [], "hidden_state": [], "prompt_embedding": []}
        for c, idx in zip(chunks, rows):
            src = _ChunkSource(self.source.take(idx), [self.source.where(int(r)) for r in idx])
            emb = pe = None
            with tempfile.TemporaryDirectory(prefix="armorm-chunk-") as tmp:
                try:
                    path = self.stage.prepare(self.backbone, src, tmp, seed=None, chunk_rows=len(idx),
                                              batch_tokens=self.batch_tokens, embeddings_dtype="float32",
                                              progress=False, quiet=True, **self.options)
                except ValueError as e:
                    # stage 2 refuses to write a file of no pairs; a chunk of them is empty, not an error
                    if "is longer than seq_len" not in str(e) or "every pair" not in str(e):
                        raise
                else:
                    f = SafetensorsFile(path)
                    emb = np.asarray(f.read("embeddings"), dtype=np.float32)
                    pe = np.asarray(f.read("prompt_embeddings"), dtype=np.float32) \
                        if "prompt_embeddings" in f else None
            H = emb.shape[-1] if emb is not None else 0
            hs = emb.reshape(-1, H) if emb is not None else np.zeros((0, 0), np.float32)
            out["chunk"].append(c)
            out["n"].append(hs.shape[0])
            out["hidden"].append(H)
            out["hidden_state"].append(hs.tobytes())
            out["prompt_embedding"].append(b"" if pe is None else pe.reshape(-1, H).tobytes())
        return pa.table({"chunk": pa.array(out["chunk"], pa.int64()), "n": pa.array(out["n"], pa.int64()),
                         "hidden": pa.array(out["hidden"], pa.int64()),
                         "hidden_state": pa.array(out["hidden_state"], pa.large_binary()),
                         "prompt_embedding": pa.array(out["prompt_embedding"], pa.large_binary())})


class _RayBackbone(ArmoRM):
    """The backbone as the driver's preparation sees it: tokenizer and config from the model directory
    (weights mapped, never read); each forward pass is the next chunk of the Ray Data job (`chunks`)."""

    requested_dtype = "bfloat16"
    chunks: Any = None
    next_chunk = 0  # the Ray job's results must come in chunk order: checked, not assumed

    @property
    def dtype(self) -> str:  # what the result records, as a run on one machine records it
        return self.requested_dtype

    def score_sequences(self, sequences: Sequence[Any], reward_pos: Any = None, fields: Any = None,
                        batch_tokens: Any = None, progress: Any = None, names: Any = None) -> RewardOutput:
        while True:
            row = next(self.chunks)
            if row["chunk"] != self.next_chunk:
                raise RuntimeError(f"the Ray job returned chunk {row['chunk']} where chunk {self.next_chunk} was "
                                   "due; nothing was written")
            self.next_chunk += 1
            if row["n"]:  # a stage-2 chunk whose pairs were all too long is never asked for
                break
        n, H = int(row["n"]), int(row["hidden"])
        if n != len(sequences):
            raise RuntimeError(f"chunk {row['chunk']}: the Ray job embedded {n} sequences, the preparation "
                               f"asks for {len(sequences)}")
        out = {"hidden_state": np.frombuffer(row["hidden_state"], np.float32).reshape(n, H)}
        if row["prompt_embedding"]:
            out["prompt_embedding"] = np.frombuffer(row["prompt_embedding"], np.float32).reshape(n, H)
        if progress is not None:
            progress(n, n)
        return RewardOutput(**{f: out[f] for f in (fields or out)})


def prepare_dataset(stage: int, model: Union[str, os.PathLike], dataset: Any, output: Union[str, os.PathLike], *,
                    actors: int = 1, threads_per_actor: int = 1, device: str = "cpu", n_shards: int = 1,
                    shard_idx: int = 1, split: str = "train", seed: Optional[int] = 0,
                    shard_mode: str = "contiguous", chunk_rows: Optional[int] = None,
                    objectives: Optional[Sequence[str]] = None, seq_len: int = 8192, torch_dtype: str = "bfloat16",
                    batch_tokens: int = 8192, check_finite: bool = True, restart: bool = False,
                    embedder: type = Embedder, **prepare_kwargs: Any) -> str:
    """`stage{1,2}.prepare` with its forward passes on a pool of `actors` Ray actors; returns the file's path.

    The file is the one the single-machine preparation writes (same rows,
    order, values and metadata): that preparation runs here, on the driver,
    and only the backbone's work is done by `Embedder` actors (or the
    `embedder` subclass given), one chunk of `chunk_rows` rows per Ray Data
    batch. `model` and `dataset` must be readable at the same paths on every
    node. Other arguments are `prepare`'s (name, embeddings_dtype,
    overwrite, progress, quiet). An interrupted run's chunks are not resumed
    on Ray: rerun without Ray to finish it, or pass `restart=True`.
    """
    from .data import open_dataset
    from .hub import resolve_model_path
    from .train import prepare as prep
    mod = _stage_module(stage)
    chunk_rows = chunk_rows or (1024 if stage == 1 else 512)
    model = str(resolve_model_path(model))
    src = open_dataset(dataset, split=split)  # opened once here; the preparation takes it as is
    name = prepare_kwargs.get("name") or src.name
    final = os.path.join(os.fspath(output), prep.shard_file_name(name, shard_idx, n_shards))
    partial = os.path.join(os.fspath(output), f".{os.path.basename(final)}.partial")
    if os.path.isdir(partial) and not restart and not os.path.exists(final):
        raise ValueError(f"{partial} holds an interrupted run's chunks, which Ray does not resume: rerun without "
                         "--ray to finish it on this machine, or pass --restart to start over")
    rows = prep.shard_rows(len(src), seed=seed, n_shards=n_shards, shard_idx=shard_idx, shard_mode=shard_mode)
    items = [{"chunk": c, "rows": rows[a:a + chunk_rows].tolist()} for c, a in enumerate(range(0, rows.size,
                                                                                          chunk_rows))]
    options = dict(objectives=objectives) if stage == 1 else dict(seq_len=seq_len)
    job = _ChunkJob(items, embedder, dict(model=model, dataset=_dataset_ref(dataset), stage=stage, split=split,
                                          torch_dtype=torch_dtype, batch_tokens=batch_tokens,
                                          num_threads=threads_per_actor, device=device, check_finite=check_finite,
                                          **options), actors, threads_per_actor, device)
    # the driver's backbone only describes the model (its forward passes run on the actors): nothing packed
    backbone = _RayBackbone.from_pretrained(model, architecture="LlamaModel", torch_dtype="auto",
                                            check_finite=False, num_threads=1, prepack=False)
    backbone.requested_dtype, backbone.chunks = str(torch_dtype), job
    try:
        return mod.prepare(backbone, src, output, n_shards=n_shards, shard_idx=shard_idx, split=split, seed=seed,
                           shard_mode=shard_mode, chunk_rows=chunk_rows, batch_tokens=batch_tokens,
                           torch_dtype=torch_dtype, restart=restart, **options, **prepare_kwargs)
    finally:
        job.close()
        backbone.close()


class _ChunkJob:
    """The Ray Data job of a preparation, started when the preparation first needs the backbone (never,
    when its file is already complete); its chunks' results stream in chunk order."""

    def __init__(self, items: List[Dict[str, Any]], embedder: type, kwargs: Dict[str, Any], actors: int,
                 threads_per_actor: int, device: str) -> None:
        self.args = (items, embedder, kwargs, actors, threads_per_actor, device)
        self.rows: Any = None

    def __next__(self) -> Dict[str, Any]:
        if self.rows is None:
            items, embedder, kwargs, actors, threads, device = self.args
            ds = _map(ray.data.from_items(items), embedder, kwargs, actors, threads, device, batch_rows=1)
            self.rows = iter(ds.iter_rows())
        return next(self.rows)

    def close(self) -> None:
        """Stops the job (a preparation that failed on the driver leaves no actors working)."""
        close = getattr(self.rows, "close", None)
        if close is not None:
            close()


def _dataset_ref(dataset: Any) -> Any:
    """A local dataset path as an absolute path (every node must hold it there); anything else as given."""
    if isinstance(dataset, (str, os.PathLike)) and os.path.exists(dataset):
        return os.path.abspath(dataset)
    return dataset


# =========================================================================== files


class JsonlDatasink(BlockBasedFileDatasink):
    """Ray Data writer of JSON lines with every float exact (`ds.write_datasink(JsonlDatasink(dir))`).

    Ray's `write_json` goes through pandas, which prints floats with at most
    15 decimals; these lines are `json.dumps` of each row, as the
    single-machine `armorm score --output` writes them.
    """

    def __init__(self, path: str, **kwargs: Any) -> None:
        super().__init__(path, file_format="jsonl", **kwargs)

    def write_block_to_file(self, block: Any, file: Any) -> None:
        for row in block.to_arrow().to_pylist():
            file.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))


def _is_uri(path: str) -> bool:
    return "://" in path


def _format_of(path: str) -> Optional[str]:
    name = path.lower()
    for comp in (".gz", ".zst", ".bz2", ".lz4"):
        if name.endswith(comp):
            name = name[: -len(comp)]
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".jsonl", ".json")):
        return "jsonl"
    return None


def resolve_inputs(spec: str, input_format: Optional[str] = None) -> Tuple[List[str], str]:
    """The files of `--input` (a file, a directory, a glob; a URI is passed to Ray as is) and their format.

    Local files are listed in sorted path order, which is the order of the
    output rows. The format is `input_format`, else the files' extension
    (.parquet, or .jsonl/.json, optionally compressed).
    """
    if _is_uri(spec):
        paths = [spec]
        fmt = input_format or _format_of(spec)
        if fmt is None:
            raise ValueError(f"--input {spec}: cannot tell the format from the name; pass --input-format")
        return paths, fmt
    if os.path.isdir(spec):
        paths = sorted(os.path.join(spec, f) for f in os.listdir(spec)
                       if not f.startswith((".", "_")) and (input_format or _format_of(f)))
        if not paths:
            raise ValueError(f"--input {spec}: the directory holds no .parquet or .jsonl files")
    else:
        paths = sorted(p for p in _glob.glob(spec) if os.path.isfile(p))
        if not paths:
            raise ValueError(f"--input {spec}: no such file" + (" (the pattern matches none)"
                                                                 if _glob.has_magic(spec) else ""))
    fmts = {input_format or _format_of(p) for p in paths}
    if None in fmts:
        bad = next(p for p in paths if _format_of(p) is None)
        raise ValueError(f"--input: {bad}: not a .parquet or .jsonl file (pass --input-format)")
    if len(fmts) > 1:
        raise ValueError(f"--input {spec}: mixes Parquet and JSONL files")
    return [os.path.abspath(p) for p in paths], fmts.pop()


def read_rows(paths: Sequence[str], fmt: str) -> "ray.data.Dataset":
    """A Dataset of the rows of `paths` (Ray Data's Parquet or JSON reader), in file order."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    ds = ray.data.read_parquet(list(paths)) if fmt == "parquet" else ray.data.read_json(list(paths))
    ds.context.execution_options.preserve_order = True
    return ds


def column_values(ds: "ray.data.Dataset", column: str) -> List[Any]:
    """The values of one column, in row order, on the driver (a dataset's ids, say)."""
    tables = ray.get(ds.select_columns([column]).to_arrow_refs())
    return [v for t in tables for v in t[column].to_pylist()]


def _file_ids(path: str, fmt: str, column: str) -> List[Any]:
    """The `column` of one file Ray wrote, in its row order."""
    if fmt == "parquet":
        import pyarrow.parquet as pq
        return pq.read_table(path, columns=[column])[column].to_pylist()
    with open(path, "rb") as fh:
        return [json.loads(line)[column] for line in fh if line.strip()]


def _read_file(path: str, fmt: str) -> Any:
    """One file Ray wrote, whole: an Arrow table (Parquet) or its lines (JSONL)."""
    if fmt == "parquet":
        import pyarrow.parquet as pq
        return pq.read_table(path)
    with open(path, "rb") as fh:
        return [line for line in fh if line.strip()]


def _write_file(path: str, fmt: str, rows: Any) -> None:
    if fmt == "parquet":
        import pyarrow.parquet as pq
        pq.write_table(rows, path)
    else:
        with open(path, "wb") as fh:
            fh.writelines(rows)


def _put_files_in_row_order(directory: str, fmt: str, column: str, expected_ids: Sequence[Any],
                            output: str) -> None:
    """Puts the files Ray wrote to `directory` in row order, then checks that together they hold exactly
    `expected_ids`, in order.

    Ray 2.60's writers do not always write a job's rows in block order (seen in this project's tests: files
    numbered out of order, and rows out of order across files), so the order is taken from the rows
    themselves. With unique ids, each file (one block, normally of consecutive rows) is renamed to where its
    first id stands in the input; if the rows are still out of order, the files are rewritten here with the
    rows in input order (the same number of files and rows per file). A row lost or written twice, or rows
    out of order under ids that are not unique, is an error.
    """
    names = [f for f in os.listdir(directory) if not f.startswith(".")]
    ids = {f: _file_ids(os.path.join(directory, f), fmt, column) for f in names}
    got_n = sum(len(v) for v in ids.values())
    if got_n != len(expected_ids):
        raise RuntimeError(f"--output {output}: {got_n} of {len(expected_ids)} rows reached this machine's disk; "
                           "on a cluster of several machines --output must be a directory every node shares (NFS) "
                           "or a URI (s3://...)")
    where = {v: i for i, v in enumerate(expected_ids)}
    unique = len(where) == len(expected_ids)
    if unique:  # files can be put in order by their first row
        names.sort(key=lambda f: where.get(ids[f][0], -1) if ids[f] else -1)
        ext = ".parquet" if fmt == "parquet" else ".jsonl"
        staged = []
        for k, f in enumerate(names):  # two steps, so no new name can collide with an old one
            tmp = os.path.join(directory, f".rename-{k:06d}")
            os.replace(os.path.join(directory, f), tmp)
            staged.append(tmp)
        renamed = [f"part-{k:06d}{ext}" for k in range(len(staged))]
        for tmp, f in zip(staged, renamed):
            os.replace(tmp, os.path.join(directory, f))
        ids = {new: ids[old] for old, new in zip(names, renamed)}
        names = renamed
    names.sort()
    got = [v for f in names for v in ids[f]]
    if got == list(expected_ids):
        return
    if unique and len(set(got)) == len(got) and set(got) == set(where):
        _rewrite_in_row_order(directory, fmt, names, [len(ids[f]) for f in names], [where[v] for v in got])
        got = [v for f in names for v in _file_ids(os.path.join(directory, f), fmt, column)]
        if got == list(expected_ids):
            return
    i = next((k for k, (a, b) in enumerate(zip(got, expected_ids)) if a != b), len(got))
    raise RuntimeError(f"--output {output}: the rows written differ from the input's at row {i} "
                       f"(id {got[i]!r}, expected {expected_ids[i]!r}); nothing was written")


def _rewrite_in_row_order(directory: str, fmt: str, names: List[str], counts: List[int],
                          positions: List[int]) -> None:
    """Rewrites the files `names` (holding `counts` rows, in that order) so that the rows, read in file order,
    stand in input order; `positions[j]` is where row j as written stands in the input."""
    order = np.argsort(np.asarray(positions, dtype=np.int64), kind="stable")
    parts = [_read_file(os.path.join(directory, f), fmt) for f in names]
    if fmt == "parquet":
        rows = pa.concat_tables(parts, promote_options="default").take(pa.array(order))
    else:
        flat = [line for part in parts for line in part]
        rows = [flat[j] for j in order]
    start = 0
    for f, n in zip(names, counts):  # each file replaced whole (a temporary name, then renamed over it)
        tmp = os.path.join(directory, f".rewrite-{f}")
        _write_file(tmp, fmt, rows.slice(start, n) if fmt == "parquet" else rows[start:start + n])
        os.replace(tmp, os.path.join(directory, f))
        start += n


def write_rows(ds: "ray.data.Dataset", output: str, fmt: str, *, expected_ids: Optional[Sequence[Any]] = None,
               id_column: str = "id", overwrite: bool = False) -> None:
    """Writes `ds` to the directory `output` with Ray Data's writers, one file per block, named in row order.

    A local `output` is written to a temporary directory beside it and renamed
    when complete, so it appears whole or not at all. With `expected_ids`
    (the input's ids, in order) the files' ids are read back first and must
    be the same, in the same order: a row lost, written twice or out of
    order, or a node that wrote to its own local disk instead of a shared
    one, is an error, not an output. A URI is written in place.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")

    def write(path: str) -> None:
        # no min_rows_per_file: Ray 2.60's write bundling can reorder blocks (seen in this project's tests)
        if fmt == "parquet":
            ds.write_parquet(path)
        else:
            ds.write_datasink(JsonlDatasink(path))

    if _is_uri(output):
        write(output)
        return
    from .atomic import make_temp_dir
    _check_output(output, overwrite)
    output = os.path.abspath(output)
    tmp = make_temp_dir(os.path.dirname(output), os.path.basename(output))
    try:
        write(tmp)
        if expected_ids is not None:
            _put_files_in_row_order(tmp, fmt, id_column, expected_ids, output)
        if os.path.lexists(output):
            shutil.rmtree(output) if os.path.isdir(output) and not os.path.islink(output) else os.unlink(output)
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# =========================================================================== the cluster


def connect(address: Optional[str] = None, *, cpus: int = 1, gpus: int = 0, progress: bool = False) -> None:
    """Joins the Ray cluster at `address` (else $RAY_ADDRESS), or starts a local one on this machine.

    A local instance gets `cpus` + 1 logical CPUs at least (the actors'
    reservations plus one for Ray Data's read and write tasks, which would
    otherwise wait behind the actors forever). On an existing cluster, too
    few CPUs or GPUs for the actors is reported (the autoscaler may add them).
    """
    import logging
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    ctx.execution_options.preserve_order = True
    ctx.raise_original_map_exception = True  # a bad row's RowError itself, not Ray's UserCodeException
    # Ray Data logs each failed task's traceback; the command line prints the error's own line instead
    logging.getLogger("ray.data").setLevel(logging.INFO if progress else logging.CRITICAL)
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    common = dict(log_to_driver=False, logging_level=logging.ERROR)
    if address is None:
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, cpus + 1), include_dashboard=False, **common)
        return
    ray.init(address=address, **common)
    have = ray.cluster_resources()
    short = []
    if have.get("CPU", 0) < cpus + 1:
        short.append(f"{have.get('CPU', 0):g} CPUs for {cpus} reserved by the actors plus one for reading")
    if have.get("GPU", 0) < gpus:
        short.append(f"{have.get('GPU', 0):g} GPUs for {gpus} actors")
    if short:
        print(f"armorm: warning: the cluster at {address} has {'; '.join(short)}: the run waits until the "
              "cluster has them", file=sys.stderr)


def user_error(e: BaseException) -> Optional[BaseException]:
    """The error a failed batch or read raised, from inside the exceptions Ray wraps around it.

    A RowError when there is one, else the innermost exception that is not
    Ray's own (None when Ray itself failed).
    """
    seen = set()
    stack: List[Optional[BaseException]] = [e]
    found: Optional[BaseException] = None
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if type(x) is RowError:
            return x
        if type(x).__module__.split(".")[0] != "ray" and not type(x).__name__.startswith("RayTaskError"):
            found = x  # the last one reached is the innermost
        stack += [x.__cause__, getattr(x, "cause", None)]  # not __context__: what was being handled
    return found


def error_message(e: BaseException) -> str:
    """One line for the command line: the failing error's own message, without Ray's tracebacks."""
    import re
    inner = user_error(e) or e
    if type(inner).__module__.split(".")[0] != "armorm":
        # Ray may have kept an armorm error (a bad row, a model that fails to load in an actor) as the text of
        # the remote traceback only
        found = [m.group(1) for m in re.finditer(r"^armorm(?:\.\w+)+Error: (.+)$", str(e), re.M)]
        if found:
            return found[-1]
    text = [line for line in str(inner).strip().splitlines() if line.strip()]
    if not text:
        return type(inner).__name__
    return text[0] if type(inner).__module__.split(".")[0] == "armorm" else f"{type(inner).__name__}: {text[0]}"


# =========================================================================== the command line


def _show_progress(args: Any) -> bool:
    return not args.no_progress and (args.progress or sys.stderr.isatty())


def _resources(args: Any, ray_progress: bool) -> Tuple[int, int, str]:
    """--actors, --threads-per-actor and --device, after connecting to (or starting) the cluster."""
    if getattr(args, "threads", None):
        raise ValueError("--threads sets one process's threads; with --ray use --threads-per-actor")
    actors, threads, device = args.actors or 1, args.threads_per_actor or 1, args.device or "cpu"
    connect(args.ray_address, cpus=actors * threads, gpus=actors if device.startswith("cuda") else 0,
            progress=ray_progress)
    return actors, threads, device


def _model_ref(model: str) -> str:
    """A local model directory as an absolute path (every node must hold it there), checked here first (its
    config and tensors are mapped, not read: a bad checkpoint is one line, not every actor failing); a hub id
    as given (each node finds it in its cache or downloads it)."""
    from .hub import resolve_model_path
    if os.path.exists(os.path.expanduser(model)) or model.startswith((".", "/", "~")) or model.count("/") != 1:
        path = resolve_model_path(model)
        ArmoRM.from_pretrained(path, torch_dtype="auto", check_finite=False, num_threads=1, prepack=False).close()
        return os.path.abspath(path)
    return model


def _run(what: Any, context: str = "") -> Any:
    """Runs a Ray Data job; a failed row or batch becomes a ValueError/RuntimeError of one line."""
    try:
        return what()
    except KeyboardInterrupt:
        raise
    except Exception as e:
        inner = user_error(e)
        msg = context + error_message(e)
        if isinstance(inner, (ValueError, OSError)):
            raise ValueError(msg) from None
        raise RuntimeError(msg) from None


def cli_score(args: Any) -> int:
    """`armorm score --ray`: files in, a directory of Parquet or JSONL files out (see docs/ray.md)."""
    from .hub import DEFAULT_MODEL
    if not args.input or not args.output:
        raise ValueError("--ray needs --input (files, a directory or a glob) and --output DIR")
    paths, fmt = resolve_inputs(args.input, args.input_format)
    out_fmt = args.output_format or fmt
    if not _is_uri(args.output):
        _check_output(args.output, args.overwrite)
    model = _model_ref(args.model or DEFAULT_MODEL)
    actors, threads, device = _resources(args, ray_progress=_show_progress(args))  # Ray Data's progress bars
    ds = read_rows(paths, fmt)
    if "id" in _run(ds.schema, f"reading {args.input}: ").names:
        ids = _run(lambda: column_values(ds, "id"), f"reading {args.input}: ")
    else:
        ds = _run(lambda: add_row_ids(ds), f"reading {args.input}: ")
        ids = list(range(ds.count()))
    n = len(ids)
    scored = score_dataset(ds, model, actors=actors, threads_per_actor=threads,
                           device=device, batch_rows=args.batch_rows or DEFAULT_BATCH_ROWS, dtype=args.dtype,
                           max_length=args.max_length, truncation=not args.no_truncation,
                           batch_tokens=args.batch_tokens, top_k=args.top_k, check_finite=not args.no_check_finite)
    _run(lambda: write_rows(scored, args.output, out_fmt, expected_ids=ids, overwrite=args.overwrite))
    print(f"wrote {n} scores to {args.output} ({out_fmt}, {actors} actor{'s' if actors > 1 else ''})",
          file=sys.stderr)
    return 0


def _check_output(output: str, overwrite: bool) -> None:
    output = os.path.abspath(output)
    parent = os.path.dirname(output)
    if not os.path.isdir(parent):
        raise ValueError(f"--output {output}: directory {parent} does not exist")
    if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)) and not overwrite:
        raise ValueError(f"--output {output}: exists and is not empty (pass --overwrite to replace it)")


def cli_prepare(args: Any, stage: int) -> int:
    """`armorm prepare-stage1/2 --ray`: the file the command writes on one machine, embedded by Ray actors."""
    actors, threads, device = _resources(args, ray_progress=False)  # the preparation's own bar instead
    kwargs: Dict[str, Any] = dict(objectives=args.objectives, seed=args.seed) if stage == 1 else \
        dict(seq_len=args.seq_len, seed=None if args.no_shuffle else args.seed)
    try:
        path = _run(lambda: prepare_dataset(
            stage, args.model, args.dataset, args.output, actors=actors, threads_per_actor=threads, device=device,
            n_shards=args.n_shards, shard_idx=args.shard_idx, split=args.split, name=args.name,
            shard_mode=args.shard_mode, chunk_rows=args.chunk_rows, batch_tokens=args.batch_tokens,
            embeddings_dtype=args.embeddings_dtype, torch_dtype=args.dtype, progress=_show_progress(args),
            overwrite=args.overwrite, restart=args.restart,
            check_finite=not args.no_check_finite, quiet=False, **kwargs))
    except KeyboardInterrupt:
        print("armorm: interrupted (a run on Ray does not resume: rerun with --restart, or without --ray to "
              "finish its chunks on this machine)", file=sys.stderr)
        return 130
    print(path)
    return 0
