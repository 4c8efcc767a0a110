"""The batching scheduler: one thread owns the model; requests queue for it.

Every HTTP request becomes a `Job` of one or more token sequences. Sequences
wait in one FIFO queue. Whenever the engine is free, the scheduler takes
sequences from the head of the queue until the next one would overflow the
token budget (a sequence longer than the budget runs alone), scores them in
one packed call, and hands each job its rows. A request that arrives while a
batch runs goes into the next one. When the queue holds less than a full
batch, the scheduler waits at most `max_wait_ms` (counted from the arrival of
the oldest waiting sequence) for more to arrive.

Strict FIFO means no starvation: the head of the queue is always in the next
batch, whatever its length. A job whose client went away before its
sequences were taken is skipped without computing anything. An exception
from the engine fails exactly the jobs that had sequences in that batch.

Packing is exact (each sequence's result is bit-identical to scoring it
alone, on the CPU), so a score never depends on what it was batched with.
"""
from __future__ import annotations

import asyncio
import collections
import math
import threading
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np

DEFAULT_MAX_BATCH_TOKENS = 8192
DEFAULT_MAX_WAIT_MS = 5.0
DEFAULT_MAX_QUEUE_TOKENS = 262144

#: engine(sequences) -> {field: array with one row per sequence}
Engine = Callable[[List[np.ndarray]], Mapping[str, np.ndarray]]


class QueueFull(Exception):
    """The queue cannot take the request now; `retry_after` is a hint in seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class TooLarge(Exception):
    """The request can never be queued: it alone holds more tokens than the queue may."""


class BatchFailed(Exception):
    """The engine raised while scoring a batch holding this job's sequences."""


class Stopped(Exception):
    """The scheduler is shutting down and takes no new work."""


class Job:
    """One request's sequences and, once scored, their rows (in order).

    Created and awaited on the event loop; completed from the scheduler thread.
    """

    def __init__(self, sequences: Sequence[np.ndarray], loop: asyncio.AbstractEventLoop) -> None:
        self.sequences = list(sequences)
        self.tokens = int(sum(s.size for s in self.sequences))
        self.future: asyncio.Future = loop.create_future()
        self._loop = loop
        self._rows: List[Optional[Dict[str, np.ndarray]]] = [None] * len(self.sequences)
        self._left = len(self.sequences)
        self._waiting = 0          # sequences still in the queue (guarded by the scheduler's lock)
        self.cancelled = False     # guarded by the scheduler's lock
        self.failed = False        # scheduler thread only

    def _put(self, index: int, row: Dict[str, np.ndarray]) -> None:
        self._rows[index] = row
        self._left -= 1
        if self._left == 0 and not self.failed:
            results = {f: np.stack([r[f] for r in self._rows]) for f in row}  # type: ignore[index]
            self._loop.call_soon_threadsafe(_resolve, self.future, results, None)

    def _fail(self, exc: BaseException) -> None:
        if not self.failed:
            self.failed = True
            self._loop.call_soon_threadsafe(_resolve, self.future, None, exc)


def _resolve(fut: asyncio.Future, result: Any, exc: Optional[BaseException]) -> None:
    if fut.done():  # the handler gave up waiting (client gone)
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)


class _Entry:
    __slots__ = ("job", "index", "tokens", "arrival")

    def __init__(self, job: Job, index: int, arrival: float) -> None:
        self.job = job
        self.index = index
        self.tokens = int(job.sequences[index].size)
        self.arrival = arrival


class SchedulerStats:
    """Hooks the scheduler calls (from its thread) so the server can count; all optional."""

    def batch(self, sequences: int, tokens: int, seconds: float, waits: Sequence[float]) -> None:
        """A batch of `sequences` / `tokens` ran in `seconds`; `waits` are its sequences' queue times."""

    def batch_failed(self, sequences: int, exc: BaseException) -> None:
        """The engine raised on a batch."""

    def skipped(self, sequences: int, tokens: int) -> None:
        """Queued sequences of jobs cancelled before their batch were dropped uncomputed."""


class Scheduler:
    """Owns the engine; see the module docstring for the policy.

    `max_batch_tokens`: tokens per engine call. `max_wait_ms`: how long the
    oldest waiting sequence may wait for company while the queue holds less
    than a full batch. `max_queue_tokens`: tokens that may wait; a request
    that would exceed it is refused with QueueFull (TooLarge when it alone
    exceeds it).
    """

    def __init__(self, engine: Engine, *, max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
                 max_wait_ms: float = DEFAULT_MAX_WAIT_MS, max_queue_tokens: int = DEFAULT_MAX_QUEUE_TOKENS,
                 stats: Optional[SchedulerStats] = None) -> None:
        if max_batch_tokens < 1 or max_queue_tokens < 1:
            raise ValueError("max_batch_tokens and max_queue_tokens must be positive")
        if not (max_wait_ms >= 0 and math.isfinite(max_wait_ms)):
            raise ValueError(f"max_wait_ms must be a finite number >= 0, got {max_wait_ms!r}")
        self._engine = engine
        self.max_batch_tokens = int(max_batch_tokens)
        self.max_wait = float(max_wait_ms) / 1000.0
        self.max_queue_tokens = int(max_queue_tokens)
        self._stats = stats or SchedulerStats()
        self._cond = threading.Condition()
        self._queue: collections.deque = collections.deque()
        self._queued_tokens = 0     # tokens of queued entries of jobs not cancelled
        self._queued_sequences = 0
        self._stopping = False
        self._flushing = False      # shutting down: no more waiting for company
        self._busy = False
        self._rate = 0.0            # tokens/s of recent batches, for Retry-After
        self._thread = threading.Thread(target=self._loop, name="armorm-scheduler", daemon=True)
        self._thread.start()

    # ---- the event loop's side --------------------------------------------

    @property
    def queued_tokens(self) -> int:
        return self._queued_tokens

    @property
    def queued_sequences(self) -> int:
        return self._queued_sequences

    @property
    def busy(self) -> bool:
        """Whether a batch is running now."""
        return self._busy

    def submit(self, sequences: Sequence[np.ndarray]) -> Job:
        """Queues a request's sequences; await `job.future` for {field: rows}.

        Must be called from the running event loop. Raises QueueFull,
        TooLarge or Stopped.
        """
        job = Job(sequences, asyncio.get_running_loop())
        if not job.sequences:
            raise ValueError("a job needs at least one sequence")
        with self._cond:
            if self._stopping:
                raise Stopped("the server is shutting down")
            if job.tokens > self.max_queue_tokens:
                raise TooLarge(f"the request holds {job.tokens} tokens, more than the queue takes at once "
                               f"(--max-queue-tokens {self.max_queue_tokens})")
            if self._queued_tokens + job.tokens > self.max_queue_tokens:
                rate = self._rate
                wait = self._queued_tokens / rate if rate > 0 else 1.0
                raise QueueFull(f"the queue is full ({self._queued_tokens} tokens waiting, "
                                f"--max-queue-tokens {self.max_queue_tokens}); retry later",
                                retry_after=int(min(60, max(1, math.ceil(wait)))))
            now = time.monotonic()
            for i in range(len(job.sequences)):
                self._queue.append(_Entry(job, i, now))
            job._waiting = len(job.sequences)
            self._queued_tokens += job.tokens
            self._queued_sequences += len(job.sequences)
            self._cond.notify()
        return job

    def cancel(self, job: Job) -> None:
        """The client is gone: its sequences not yet taken into a batch are never computed."""
        with self._cond:
            if job.cancelled:
                return
            job.cancelled = True
            if job._waiting:
                left = [e for e in self._queue if e.job is job]
                self._queued_tokens -= sum(e.tokens for e in left)
                self._queued_sequences -= len(left)
                self._cond.notify()  # the budget check may now start a batch

    def flush(self) -> None:
        """From now on, batches start as soon as the engine is free (no waiting for company).

        Called when a shutdown begins, so requests in flight finish without waiting out `max_wait_ms`.
        """
        with self._cond:
            self._flushing = True
            self._cond.notify()

    def stop(self, timeout: Optional[float] = None) -> None:
        """Finishes the queued work, then ends the thread (new submissions raise Stopped)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)

    # ---- the scheduler thread ---------------------------------------------

    def _take_batch(self) -> Optional[List[_Entry]]:
        """Waits for work, then pops the next batch (None once stopped and drained)."""
        with self._cond:
            while True:
                self._drop_cancelled_head()
                if self._queue:
                    break
                if self._stopping:
                    return None
                self._cond.wait()
            # wait for company while the queue holds less than a batch and the oldest may still wait
            while not (self._stopping or self._flushing):
                self._drop_cancelled_head()
                if not self._queue:
                    return []
                left = self._queue[0].arrival + self.max_wait - time.monotonic()
                if self._queued_tokens >= self.max_batch_tokens or left <= 0:
                    break
                self._cond.wait(min(left, threading.TIMEOUT_MAX))
            batch: List[_Entry] = []
            used = 0
            while self._queue:
                e = self._queue[0]
                if e.job.cancelled:
                    self._pop_skipped()
                    continue
                if batch and used + e.tokens > self.max_batch_tokens:
                    break
                self._queue.popleft()
                e.job._waiting -= 1
                self._queued_tokens -= e.tokens
                self._queued_sequences -= 1
                batch.append(e)
                used += e.tokens
            self._busy = bool(batch)
            return batch

    def _drop_cancelled_head(self) -> None:
        while self._queue and self._queue[0].job.cancelled:
            self._pop_skipped()

    def _pop_skipped(self) -> None:
        e = self._queue.popleft()
        e.job._waiting -= 1
        self._stats.skipped(1, e.tokens)

    def _loop(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            if batch:
                self._run(batch)
            self._busy = False

    def _run(self, batch: List[_Entry]) -> None:
        start = time.monotonic()
        tokens = sum(e.tokens for e in batch)
        live = [e for e in batch if not e.job.failed]
        if not live:
            return
        try:
            out = self._engine([e.job.sequences[e.index] for e in live])
        except Exception as exc:  # noqa: BLE001 - any engine failure fails exactly this batch
            self._stats.batch_failed(len(batch), exc)
            err = BatchFailed(f"scoring failed: {type(exc).__name__}: {exc}")
            for e in batch:
                e.job._fail(err)
            return
        seconds = time.monotonic() - start
        if seconds > 0:
            rate = tokens / seconds
            self._rate = rate if self._rate == 0 else 0.8 * self._rate + 0.2 * rate
        for k, e in enumerate(live):
            e.job._put(e.index, {f: v[k] for f, v in out.items()})
        self._stats.batch(len(batch), tokens, seconds, [start - e.arrival for e in batch])
