"""Writing output files so that they appear only complete."""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from typing import IO, Iterator, Union


@contextmanager
def atomic_open(path: Union[str, os.PathLike], binary: bool = False) -> Iterator[IO]:
    """Opens a temporary file beside `path`; on success it is fsynced and renamed over `path`.

    On any exception (Ctrl-C included) the temporary file is removed and `path`
    is left as it was. Temporary names are `.<name>.<random>.tmp`, so an
    interrupted run's leftovers are recognisable.
    """
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
