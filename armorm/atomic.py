"""Writing output files so that they appear only complete, with the permissions the umask gives."""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from typing import IO, Iterator, Union


def current_umask() -> int:
    """The process umask, read without changing it where /proc tells it (os.umask alone must set it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: briefly set, then restored
    os.umask(mask)
    return mask


def make_temp_dir(parent: Union[str, os.PathLike], name: str) -> str:
    """A new temporary directory `.<name>.<random>.tmp` in `parent`, with the umask's permissions.

    (tempfile.mkdtemp makes it 0700 whatever the umask; a finished output
    renamed from it must look like any other directory the user creates.)
    """
    tmp = tempfile.mkdtemp(prefix="." + name + ".", suffix=".tmp", dir=parent)
    os.chmod(tmp, 0o777 & ~current_umask())
    return tmp


@contextmanager
def atomic_open(path: Union[str, os.PathLike], binary: bool = False) -> Iterator[IO]:
    """Opens a temporary file beside `path`; on success it is fsynced and renamed over `path`.

    On any exception (Ctrl-C included) the temporary file is removed and `path`
    is left as it was. Temporary names are `.<name>.<random>.tmp`, so an
    interrupted run's leftovers are recognisable. The file gets the
    permissions any new file gets under the umask (0644 under umask 022).
    """
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=d)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600; the output is ordinary shared data
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
