"""A progress callback for long jobs: tqdm when installed, else a stderr line."""
from __future__ import annotations

import sys
import time
from typing import Callable, Optional


def make_progress(total: int, enabled: bool = True, desc: str = "scoring",
                  unit: str = "conv") -> Optional[Callable[[int, int], None]]:
    """Returns `callback(done, total)` or None when disabled."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False)
        state = {"done": 0}

        def update(done: int, _total: int) -> None:
            bar.update(done - state["done"])
            state["done"] = done
            if done >= total:
                bar.close()
        return update
    start = time.monotonic()

    def report(done: int, _total: int) -> None:
        rate = done / max(time.monotonic() - start, 1e-9)
        end = "\n" if done >= total else ""
        print(f"\r{desc}: {done}/{total} {unit} ({rate:.1f}/s)", end=end, file=sys.stderr, flush=True)
    return report
