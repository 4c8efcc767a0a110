"""Reading training datasets: JSONL, Parquet, `datasets` directories and hub ids.

`iter_jsonl(path)` reads a JSON Lines file line by line (the CLI's
conversations); `open_dataset(source)` returns a `RecordSource`: its length, and `take(rows)`
giving those rows as dicts, read on demand (a JSONL file is indexed by line
offsets, not loaded). `where(row)` describes a row for error messages
("data.jsonl line 18", "row 17").

Sources, by what `source` is:

- a `.jsonl` / `.json` file: one JSON object per line (blank lines skipped);
  a `.json` file holding one JSON array of objects is read whole;
- a `.parquet` file, or a directory of Parquet files (needs `pyarrow`);
- a directory written by `datasets`' `save_to_disk` (needs `datasets`);
- anything else: a Hugging Face hub dataset id, loaded with
  `datasets.load_dataset` (needs `datasets` and the hub or its cache).

Optional dependencies are imported only when a source needs them; a missing
one raises ImportError saying what to install.
"""
from __future__ import annotations

import glob
import json
import os
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np


class DatasetError(ValueError):
    """A dataset that cannot be read (the message names the file and row)."""


class RecordSource:
    """Random access to the rows of a dataset, as dicts."""

    #: Default name of outputs made from this dataset (the reference uses the last path component).
    name: str = "dataset"
    #: A description of where the data is, for messages and resume checks.
    location: str = ""

    def __len__(self) -> int:
        raise NotImplementedError

    def columns(self) -> Optional[List[str]]:
        """Column names when the source has a schema; None (JSONL: per-row keys)."""
        return None

    def take(self, rows: Sequence[int]) -> List[Dict[str, Any]]:
        raise NotImplementedError

    def where(self, row: int) -> str:
        return f"row {row}"

    def fingerprint(self) -> Dict[str, Any]:
        """What identifies this data for resuming an interrupted job."""
        return {"location": self.location, "rows": len(self)}


def parse_json_line(raw: bytes, where: str) -> Any:
    """One JSON Lines record; a DatasetError naming `where` when it is not UTF-8 or not JSON."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DatasetError(f"{where}: not valid UTF-8 (byte {e.start})") from None
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{where}: not valid JSON ({e.msg})") from None


def iter_jsonl(path: str) -> Iterator[Tuple[int, Any]]:
    """(line number, record) for each non-blank line of a JSON Lines file, read as it goes; errors name
    `path:line`."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if raw.strip():
                yield lineno, parse_json_line(raw, f"{path}:{lineno}")


def _file_fingerprint(paths: Sequence[str]) -> List[List[Any]]:
    out = []
    for p in paths:
        try:
            out.append([os.path.basename(p), os.path.getsize(p)])
        except OSError:
            out.append([os.path.basename(p), None])
    return out


def _strip_ext(name: str) -> str:
    for ext in (".jsonl", ".json", ".parquet", ".gz"):
        if name.endswith(ext):
            name = name[: -len(ext)]
    return name or "dataset"


class JsonlSource(RecordSource):
    """A JSON Lines file, indexed by the byte offsets of its non-blank lines."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.location = os.path.abspath(path)
        self.name = _strip_ext(os.path.basename(os.path.normpath(path)))
        offsets: List[int] = []
        linenos: List[int] = []
        try:
            with open(path, "rb") as f:
                pos = 0
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        offsets.append(pos)
                        linenos.append(lineno)
                    pos += len(line)
        except OSError as e:
            raise DatasetError(f"cannot read {path}: {e.strerror or e}") from None
        self._offsets = np.asarray(offsets, dtype=np.int64)
        self._linenos = np.asarray(linenos, dtype=np.int64)
        if not len(self._offsets):
            raise DatasetError(f"{path}: no records (the file is empty)")

    def __len__(self) -> int:
        return int(self._offsets.size)

    def where(self, row: int) -> str:
        return f"row {row} ({os.path.basename(self.path)} line {int(self._linenos[row])})"

    def take(self, rows: Sequence[int]) -> List[Dict[str, Any]]:
        out: List[Dict[str, Any]] = []
        with open(self.path, "rb") as f:
            for r in rows:
                r = int(r)
                f.seek(int(self._offsets[r]))
                rec = parse_json_line(f.readline(), self.where(r))
                if not isinstance(rec, dict):
                    raise DatasetError(f"{self.where(r)}: expected a JSON object, got {type(rec).__name__}")
                out.append(rec)
        return out

    def fingerprint(self) -> Dict[str, Any]:
        return {"location": self.location, "rows": len(self), "files": _file_fingerprint([self.path])}


class ListSource(RecordSource):
    """Records already in memory (a `.json` array file, or a list passed from Python)."""

    def __init__(self, records: Sequence[Any], name: str = "dataset", location: str = "<memory>",
                 files: Sequence[str] = ()) -> None:
        self._records = list(records)
        self.name = name
        self.location = location
        self._files = list(files)
        if not self._records:
            raise DatasetError(f"{location}: no records")

    def __len__(self) -> int:
        return len(self._records)

    def take(self, rows: Sequence[int]) -> List[Dict[str, Any]]:
        out = []
        for r in rows:
            rec = self._records[int(r)]
            if not isinstance(rec, dict):
                raise DatasetError(f"{self.where(int(r))}: expected a dict record, got {type(rec).__name__}")
            out.append(rec)
        return out

    def fingerprint(self) -> Dict[str, Any]:
        fp: Dict[str, Any] = {"location": self.location, "rows": len(self)}
        if self._files:
            fp["files"] = _file_fingerprint(self._files)
        return fp


def _need(module: str, what: str) -> Any:
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        pkg = {"pyarrow.parquet": "pyarrow"}.get(module, module)
        raise ImportError(f"reading {what} needs the optional package {pkg!r}: pip install {pkg}") from None


class ArrowSource(RecordSource):
    """A pyarrow Table (from Parquet files)."""

    def __init__(self, table: Any, name: str, location: str, files: Sequence[str] = ()) -> None:
        self._table = table
        self.name = name
        self.location = location
        self._files = list(files)

    def __len__(self) -> int:
        return int(self._table.num_rows)

    def columns(self) -> Optional[List[str]]:
        return list(self._table.column_names)

    def take(self, rows: Sequence[int]) -> List[Dict[str, Any]]:
        import pyarrow as pa
        return self._table.take(pa.array(np.asarray(rows, dtype=np.int64))).to_pylist()

    def fingerprint(self) -> Dict[str, Any]:
        return {"location": self.location, "rows": len(self), "files": _file_fingerprint(self._files)}


class HFSource(RecordSource):
    """A `datasets.Dataset` (from `load_from_disk` or `load_dataset`)."""

    def __init__(self, ds: Any, name: str, location: str) -> None:
        self._ds = ds
        self.name = name
        self.location = location

    def __len__(self) -> int:
        return len(self._ds)

    def columns(self) -> Optional[List[str]]:
        return list(self._ds.column_names)

    def take(self, rows: Sequence[int]) -> List[Dict[str, Any]]:
        return list(self._ds.select([int(r) for r in rows]))

    def fingerprint(self) -> Dict[str, Any]:
        fp = getattr(self._ds, "_fingerprint", None)
        return {"location": self.location, "rows": len(self), "hf_fingerprint": fp}


def _pick_split(obj: Any, split: str, what: str) -> Any:
    if hasattr(obj, "keys") and not hasattr(obj, "column_names"):  # a DatasetDict
        if split not in obj:
            raise DatasetError(f"{what} has no split {split!r} (it has {', '.join(obj.keys())})")
        return obj[split]
    return obj


def _parquet_files(path: str, split: str) -> List[str]:
    files = sorted(glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True))
    if not files:
        return []
    named = [f for f in files if os.path.basename(f).startswith(split + "-") or
             os.path.basename(f).startswith(split + ".") or
             os.path.basename(os.path.dirname(f)) == split]
    return named or files


def open_dataset(source: Any, split: str = "train", columns: Optional[Sequence[str]] = None) -> RecordSource:
    """Opens a dataset (see the module docstring for the kinds of `source`).

    `split` picks the split of a `datasets` DatasetDict or hub dataset (and
    of a Parquet directory laid out as `<split>-*.parquet`). `columns`, when
    given, limits what Parquet readers load (missing ones are not an error
    here: the caller checks them).
    """
    if isinstance(source, RecordSource):
        return source
    if isinstance(source, (list, tuple)):
        return ListSource(source)
    if hasattr(source, "column_names") and hasattr(source, "select"):  # a datasets.Dataset
        return HFSource(source, "dataset", "<datasets.Dataset>")
    path = os.fspath(source)
    if os.path.isfile(path):
        low = path.lower()
        if low.endswith(".parquet"):
            pq = _need("pyarrow.parquet", "Parquet files")
            table = pq.read_table(path, columns=_existing_columns(pq, [path], columns))
            return ArrowSource(table, _strip_ext(os.path.basename(path)), os.path.abspath(path), [path])
        if low.endswith(".json"):
            with open(path, "rb") as f:
                first = f.read(4096).lstrip()
            if first.startswith(b"["):
                try:
                    with open(path, "r", encoding="utf-8") as f:
                        records = json.load(f)
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    raise DatasetError(f"{path}: not valid JSON ({e})") from None
                return ListSource(records, _strip_ext(os.path.basename(path)), os.path.abspath(path), [path])
        return JsonlSource(path)
    if os.path.isdir(path):
        name = os.path.basename(os.path.normpath(path))
        marker = [m for m in ("dataset_dict.json", "state.json", "dataset_info.json")
                  if os.path.isfile(os.path.join(path, m))]
        if marker and any(m in ("dataset_dict.json", "state.json") for m in marker):
            datasets = _need("datasets", "a `datasets` save_to_disk directory")
            ds = _pick_split(datasets.load_from_disk(path), split, path)
            return HFSource(ds, name, os.path.abspath(path))
        files = _parquet_files(path, split)
        if files:
            pq = _need("pyarrow.parquet", "Parquet files")
            import pyarrow as pa
            cols = _existing_columns(pq, files, columns)
            table = pa.concat_tables([pq.read_table(f, columns=cols) for f in files])
            return ArrowSource(table, name, os.path.abspath(path), files)
        jsonl = sorted(glob.glob(os.path.join(path, "*.jsonl")))
        if len(jsonl) == 1:
            return JsonlSource(jsonl[0])
        raise DatasetError(f"{path}: a directory without a `datasets` save_to_disk layout, Parquet files, "
                           f"or a single .jsonl file")
    if path.startswith((".", "/", "~")) or path.count("/") > 1 or \
            path.lower().endswith((".jsonl", ".json", ".parquet", ".arrow", ".gz")):
        raise DatasetError(f"{path}: no such file or directory")
    # a hub id
    try:
        import datasets
    except ImportError:
        raise ImportError(f"{path!r} is not a local file or directory; loading it as a Hugging Face hub dataset "
                          "needs the optional package 'datasets': pip install datasets") from None
    try:
        ds = datasets.load_dataset(path, split=split)
    except Exception as e:  # network, auth, unknown id: say what was tried
        raise DatasetError(f"{path!r} is not a local file or directory, and loading it as a hub dataset "
                           f"failed: {type(e).__name__}: {e}") from None
    return HFSource(ds, path.rstrip("/").split("/")[-1], path)


def _existing_columns(pq: Any, files: Sequence[str], wanted: Optional[Sequence[str]]) -> Optional[List[str]]:
    if wanted is None:
        return None
    names = set(pq.read_schema(files[0]).names)
    return [c for c in wanted if c in names]
