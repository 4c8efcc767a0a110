"""Safetensors files from NumPy (no torch, no `safetensors`): the core reads, this module writes.

The format: an 8-byte little-endian header length n, n bytes of JSON
(`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__":
{str: str}}`), then the tensor bytes (row-major, little-endian), offsets
relative to the end of the header.

Reading: every file (checkpoints and what training writes) goes through the
core's hardened parser, `SafetensorsFile` (armorm._core): `info(name)`,
`read(name, start, stop, out=, dtype=)` (a copy of rows, optionally converted
to float32/float64), `view(name)` (zero-copy), `metadata`, `keys()`.
bfloat16 has no NumPy dtype: it is held as its raw 16-bit patterns (uint16);
`bf16_to_float32` / `float32_to_bf16` convert (the core's rounding: nearest
even, as torch).

Writing (`save_file`) goes to a temporary file in the destination's directory,
which is fsynced and then renamed over the destination: a reader never sees a
partial file under the final name.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ._core import SafetensorsFile, bf16_to_float32, float32_to_bf16
from .atomic import atomic_open

__all__ = ["DTYPES", "SafetensorsFile", "bf16_to_float32", "float32_to_bf16", "load_file", "save_file", "to_float"]

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

def to_float(raw: np.ndarray, st_dtype: str, out_dtype: Any = np.float32) -> np.ndarray:
    """Stored values already in memory (BF16 as uint16 bits) -> floating point of `out_dtype`.

    Reading from a file converts on the way instead: `SafetensorsFile.read(name, dtype=...)`.
    """
    if st_dtype == "BF16":
        return bf16_to_float32(raw).astype(out_dtype, copy=False)
    return np.asarray(raw).astype(out_dtype, copy=False)


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
    """All tensors of a file, copied; BF16 as uint16 bits unless `as_float32`."""
    f = SafetensorsFile(path)
    return {name: f.read(name, dtype=np.float32 if as_float32 and f.info(name).dtype == "BF16" else None)
            for name in f.keys()}
