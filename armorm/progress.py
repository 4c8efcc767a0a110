"""Progress of long jobs on stderr: a tqdm bar when tqdm is installed, else a line redrawn in place.

`Progress` is the one helper every long job uses (scoring, embedding a
dataset, X^T X accumulation, gating training); `make_progress` adapts it to
the `progress(done, total)` callback `ArmoRM.score_sequences` calls.
"""
from __future__ import annotations

import sys
import time
from typing import Any, Callable, Optional, Union

#: What a job's `progress=` argument may be: None (a bar when stderr is a terminal), True / False, or a
#: callable the job calls itself instead of drawing anything (each job documents its arguments).
ProgressArg = Union[None, bool, Callable[..., None]]


class Progress:
    """A bar of `total` units, starting at `initial`; optionally counts tokens too (shown as tok/s).

    `show`: None (a bar when stderr is a terminal), True, False, or a callable
    `callback(done, total, tokens)` called on each update instead of drawing.
    `update(n, tokens)` advances; `close()` ends the line (also on leaving a
    `with` block).
    """

    def __init__(self, total: int, *, show: ProgressArg = None, initial: int = 0, desc: str = "",
                 unit: str = "ex", leave: bool = True) -> None:
        self.total, self.done, self.tokens = int(total), int(initial), 0
        self.desc, self.unit = desc, unit
        self.callback = show if callable(show) else None
        self.enabled = self.callback is None and (sys.stderr.isatty() if show is None else bool(show))
        self.start = time.monotonic()
        self._last_print = 0.0
        self._closed = False
        self.bar = None
        if self.enabled:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr,
                                dynamic_ncols=True, smoothing=0.1, leave=leave)
            except ImportError:
                self.bar = None

    def update(self, n: int, tokens: int = 0, postfix: Optional[str] = None) -> None:
        """Advances by `n` units and `tokens` tokens; `postfix` replaces the rate shown after the bar."""
        self.done += n
        self.tokens += tokens
        if self.callback is not None:
            self.callback(self.done, self.total, self.tokens)
            return
        if not self.enabled:
            return
        now = time.monotonic()
        elapsed = max(now - self.start, 1e-9)
        extra = postfix if postfix is not None else f"{self.tokens / elapsed:,.0f} tok/s" if self.tokens else None
        if self.bar is not None:
            if extra:
                self.bar.set_postfix_str(extra, refresh=False)
            self.bar.update(n)
        elif now - self._last_print > 0.5 or self.done >= self.total:
            self._last_print = now
            tail = f", {extra}" if extra else ""
            print(f"\r{self.desc}: {self.done}/{self.total} {self.unit} "
                  f"({self.done / elapsed:.1f} {self.unit}/s{tail})", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            print(file=sys.stderr)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def make_progress(total: int, enabled: bool = True, desc: str = "scoring",
                  unit: str = "conv") -> Optional[Callable[[int, int], None]]:
    """A `callback(done, total)` drawing a `Progress` (closed when `done` reaches `total`), or None."""
    if not enabled:
        return None
    bar = Progress(total, show=True, desc=desc, unit=unit, leave=False)

    def update(done: int, _total: int) -> None:
        bar.update(done - bar.done)
        if done >= total:
            bar.close()
    return update
