"""Reading and writing safetensors files with NumPy alone (no torch, no `safetensors`).

The format: an 8-byte little-endian header length n, n bytes of JSON
(`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__":
{str: str}}`), then the tensor bytes (row-major, little-endian), offsets
relative to the end of the header. bfloat16 has no NumPy dtype: it is read and
written as its raw 16-bit patterns (uint16); `bf16_to_float32` /
`float32_to_bf16` convert (round to nearest even, as torch does).

Writing goes to a temporary file in the destination's directory, which is
fsynced and then renamed over the destination: a reader never sees a partial
file under the final name.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .atomic import atomic_open

#: safetensors dtype name -> NumPy dtype of the stored bytes (BF16 as its raw uint16 bits).
DTYPES: Dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_NUMPY_TO_ST = {np.dtype("float64"): "F64", np.dtype("float32"): "F32", np.dtype("float16"): "F16",
                np.dtype("int64"): "I64", np.dtype("int32"): "I32", np.dtype("int16"): "I16",
                np.dtype("int8"): "I8", np.dtype("uint64"): "U64", np.dtype("uint32"): "U32",
                np.dtype("uint16"): "U16", np.dtype("uint8"): "U8", np.dtype("bool"): "BOOL"}
MAX_HEADER_BYTES = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    """A file that is not a well-formed safetensors file."""


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """Raw bfloat16 bit patterns (uint16) -> float32, exactly."""
    bits = np.ascontiguousarray(bits, dtype=np.uint16)
    return (bits.astype(np.uint32) << 16).view(np.float32)


def float32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> raw bfloat16 bits (uint16), rounding to nearest even; NaN stays NaN."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    u = x.view(np.uint32)
    rounded = ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = ((u[nan] >> np.uint32(16)) | np.uint32(0x0040)).astype(np.uint16)  # quiet NaN, sign kept
    return rounded


def to_float(raw: np.ndarray, st_dtype: str, out_dtype: Any = np.float32) -> np.ndarray:
    """Stored values (as read from a file) -> floating point of `out_dtype`."""
    if st_dtype == "BF16":
        return bf16_to_float32(raw).astype(out_dtype, copy=False)
    return np.asarray(raw).astype(out_dtype, copy=False)


class TensorInfo:
    __slots__ = ("name", "dtype", "shape", "begin", "end")

    def __init__(self, name: str, dtype: str, shape: Tuple[int, ...], begin: int, end: int) -> None:
        self.name, self.dtype, self.shape, self.begin, self.end = name, dtype, shape, begin, end

    @property
    def np_dtype(self) -> np.dtype:
        return DTYPES[self.dtype]

    @property
    def row_bytes(self) -> int:
        n = self.np_dtype.itemsize
        for d in self.shape[1:]:
            n *= d
        return n


class SafetensorsFile:
    """A parsed safetensors header; tensors (or row ranges of them) are read on demand.

    `read(name)` returns the stored values (BF16 as uint16 bits);
    `read_rows(name, start, stop)` reads rows [start, stop) of the first axis
    with one contiguous read, without mapping the whole file.
    """

    def __init__(self, path: Union[str, os.PathLike]) -> None:
        self.path = os.fspath(path)
        try:
            size = os.path.getsize(self.path)
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise SafetensorsError(f"{self.path}: not a safetensors file (shorter than 8 bytes)")
                n = int.from_bytes(head, "little")
                if n > MAX_HEADER_BYTES or n + 8 > size:
                    raise SafetensorsError(f"{self.path}: not a safetensors file (header length {n} "
                                           f"does not fit the file's {size} bytes)")
                raw = f.read(n)
        except OSError as e:
            raise SafetensorsError(f"cannot read {self.path}: {e.strerror or e}") from None
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise SafetensorsError(f"{self.path}: not a safetensors file (header is not JSON)") from None
        if not isinstance(header, dict):
            raise SafetensorsError(f"{self.path}: safetensors header is not a JSON object")
        self.data_start = 8 + n
        data_size = size - self.data_start
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict):
            raise SafetensorsError(f"{self.path}: __metadata__ must be an object")
        self.metadata: Dict[str, str] = {str(k): str(v) for k, v in meta.items()}
        self.tensors: Dict[str, TensorInfo] = {}
        for name, e in header.items():
            try:
                dtype, shape, (b, end) = e["dtype"], tuple(int(d) for d in e["shape"]), e["data_offsets"]
                b, end = int(b), int(end)
            except (KeyError, TypeError, ValueError):
                raise SafetensorsError(f"{self.path}: malformed header entry for tensor {name!r}") from None
            if dtype not in DTYPES:
                raise SafetensorsError(f"{self.path}: tensor {name!r} has unsupported dtype {dtype}")
            count = 1
            for d in shape:
                if d < 0:
                    raise SafetensorsError(f"{self.path}: tensor {name!r} has a negative dimension")
                count *= d
            if not (0 <= b <= end <= data_size) or end - b != count * DTYPES[dtype].itemsize:
                raise SafetensorsError(f"{self.path}: tensor {name!r} ({dtype} {list(shape)}) has data offsets "
                                       f"[{b}, {end}] that do not match its size or the file (truncated file?)")
            self.tensors[name] = TensorInfo(name, dtype, shape, b, end)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def keys(self) -> List[str]:
        return list(self.tensors)

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise SafetensorsError(f"{self.path}: no tensor named {name!r} "
                                   f"(it has {', '.join(self.tensors) or 'none'})") from None

    def read(self, name: str) -> np.ndarray:
        t = self.info(name)
        return self.read_rows(name, 0, t.shape[0] if t.shape else 1) if t.shape else \
            self._read_bytes(t.begin, t.end, t.np_dtype).reshape(())

    def read_rows(self, name: str, start: int, stop: int, out: Optional[np.ndarray] = None) -> np.ndarray:
        t = self.info(name)
        if not t.shape:
            raise SafetensorsError(f"{self.path}: tensor {name!r} is a scalar")
        if not 0 <= start <= stop <= t.shape[0]:
            raise IndexError(f"rows [{start}, {stop}) out of range for {name!r} with {t.shape[0]} rows")
        rb = t.row_bytes
        shape = (stop - start,) + t.shape[1:]
        if out is None:
            out = np.empty(shape, dtype=t.np_dtype)
        elif out.shape != shape or out.dtype != t.np_dtype or not out.flags.c_contiguous:
            raise ValueError("read_rows: `out` has the wrong shape, dtype or layout")
        if out.size:
            with open(self.path, "rb") as f:
                f.seek(self.data_start + t.begin + start * rb)
                got = f.readinto(memoryview(out).cast("B"))
            if got != (stop - start) * rb:
                raise SafetensorsError(f"{self.path}: file is truncated")
        return out

    def _read_bytes(self, b: int, e: int, dtype: np.dtype) -> np.ndarray:
        with open(self.path, "rb") as f:
            f.seek(self.data_start + b)
            data = f.read(e - b)
        return np.frombuffer(data, dtype=dtype).copy()


#: A tensor to write: an array (its own dtype), or (st_dtype, shape, iterable of arrays) streamed in order.
TensorSpec = Union[np.ndarray, Tuple[str, Sequence[int], Iterable[np.ndarray]]]


def _spec(name: str, value: Any, dtypes: Mapping[str, str]) -> Tuple[str, Tuple[int, ...], Iterable[np.ndarray]]:
    if isinstance(value, tuple):
        st, shape, parts = value
        if st not in DTYPES:
            raise ValueError(f"tensor {name!r}: unknown safetensors dtype {st!r}")
        return st, tuple(int(d) for d in shape), parts
    a = np.asarray(value)
    st = dtypes.get(name)
    if st == "BF16":
        if a.dtype != np.uint16:
            a = float32_to_bf16(a.astype(np.float32, copy=False))
    elif st is not None:
        a = a.astype(DTYPES[st], copy=False)
    else:
        if a.dtype not in _NUMPY_TO_ST:
            raise ValueError(f"tensor {name!r}: dtype {a.dtype} cannot be stored in safetensors")
        st = _NUMPY_TO_ST[a.dtype]
    return st, a.shape, [a]


def save_file(tensors: Mapping[str, Any], path: Union[str, os.PathLike],
              metadata: Optional[Mapping[str, str]] = None, dtypes: Optional[Mapping[str, str]] = None) -> None:
    """Writes `tensors` (name -> array, or (dtype, shape, parts) to stream) to `path` atomically.

    `dtypes` maps names to a stored safetensors dtype ("BF16" converts float
    arrays by rounding to nearest even; uint16 arrays are taken as bf16 bits).
    Tensors are laid out in the given order. The file appears under `path`
    only when complete.
    """
    path = os.fspath(path)
    specs = {name: _spec(name, v, dtypes or {}) for name, v in tensors.items()}
    header: Dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, (st, shape, _) in specs.items():
        n = DTYPES[st].itemsize
        for d in shape:
            n *= d
        header[name] = {"dtype": st, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    hb = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hb += b" " * (-len(hb) % 8)
    with atomic_open(path, binary=True) as f:
        f.write(len(hb).to_bytes(8, "little"))
        f.write(hb)
        for name, (st, shape, parts) in specs.items():
            want = header[name]["data_offsets"][1] - header[name]["data_offsets"][0]
            wrote = 0
            for p in parts:
                p = np.ascontiguousarray(p)
                if p.dtype.itemsize != DTYPES[st].itemsize or p.dtype.kind != DTYPES[st].kind:
                    p = p.astype(DTYPES[st])
                if p.dtype.byteorder == ">":
                    p = p.astype(p.dtype.newbyteorder("<"))
                f.write(memoryview(p).cast("B"))
                wrote += p.nbytes
            if wrote != want:
                raise ValueError(f"tensor {name!r}: wrote {wrote} bytes, expected {want} for {st} {list(shape)}")


def load_file(path: Union[str, os.PathLike], as_float32: bool = False) -> Dict[str, np.ndarray]:
    """All tensors of a file; BF16 as uint16 bits unless `as_float32`."""
    f = SafetensorsFile(path)
    out = {}
    for name, t in f.tensors.items():
        a = f.read(name)
        out[name] = to_float(a, t.dtype) if as_float32 and t.dtype == "BF16" else a
    return out
