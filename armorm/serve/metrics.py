"""Prometheus metrics of one server (its own registry, so several apps can live in one process)."""
from __future__ import annotations

from typing import Any, Sequence

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

from .scheduler import SchedulerStats

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_TOKENS = tuple(float(2 ** k) for k in range(4, 18))
_SEQUENCES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics(SchedulerStats):
    """Requests and tokens by endpoint, batch sizes, queue depth, latencies and errors by kind."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("armorm_requests", "HTTP requests answered, by endpoint and status code",
                                ["endpoint", "code"], registry=r)
        self.sequences = Counter("armorm_request_sequences", "Sequences scored, by endpoint", ["endpoint"],
                                 registry=r)
        self.tokens = Counter("armorm_request_tokens", "Tokens scored, by endpoint", ["endpoint"], registry=r)
        self.latency = Histogram("armorm_request_latency_seconds", "Time from a request's arrival to its answer",
                                 ["endpoint"], buckets=_LATENCY, registry=r)
        self.errors = Counter("armorm_errors", "Refused or failed requests, by kind", ["kind"], registry=r)
        self.in_flight = Gauge("armorm_requests_in_flight", "Requests being handled now", registry=r)
        self.queue_wait = Histogram("armorm_queue_wait_seconds", "Time a sequence waited in the queue",
                                    buckets=_LATENCY, registry=r)
        self.batch_seconds = Histogram("armorm_batch_seconds", "Engine time per batch", buckets=_LATENCY,
                                       registry=r)
        self.batch_tokens = Histogram("armorm_batch_tokens", "Tokens per batch", buckets=_TOKENS, registry=r)
        self.batch_sequences = Histogram("armorm_batch_sequences", "Sequences per batch", buckets=_SEQUENCES,
                                         registry=r)
        self.failed_batches = Counter("armorm_failed_batches", "Batches whose scoring raised", registry=r)
        self.engine_tokens = Counter("armorm_engine_tokens", "Tokens computed by the engine", registry=r)
        self.skipped_sequences = Counter("armorm_skipped_sequences",
                                         "Queued sequences dropped uncomputed because their client went away",
                                         registry=r)
        self.skipped_tokens = Counter("armorm_skipped_tokens", "Tokens of those sequences", registry=r)
        self.queue_tokens = Gauge("armorm_queue_tokens", "Tokens waiting in the queue", registry=r)
        self.queue_sequences = Gauge("armorm_queue_sequences", "Sequences waiting in the queue", registry=r)
        self.engine_busy = Gauge("armorm_engine_busy", "1 while a batch runs", registry=r)

    def watch(self, scheduler: Any) -> None:
        """Reads the queue gauges from the scheduler at each scrape."""
        self.queue_tokens.set_function(lambda: scheduler.queued_tokens)
        self.queue_sequences.set_function(lambda: scheduler.queued_sequences)
        self.engine_busy.set_function(lambda: 1 if scheduler.busy else 0)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # ---- SchedulerStats ------------------------------------------------------

    def batch(self, sequences: int, tokens: int, seconds: float, waits: Sequence[float]) -> None:
        self.batch_sequences.observe(sequences)
        self.batch_tokens.observe(tokens)
        self.batch_seconds.observe(seconds)
        self.engine_tokens.inc(tokens)
        for w in waits:
            self.queue_wait.observe(w)

    def batch_failed(self, sequences: int, exc: BaseException) -> None:
        self.failed_batches.inc()

    def skipped(self, sequences: int, tokens: int) -> None:
        self.skipped_sequences.inc(sequences)
        self.skipped_tokens.inc(tokens)
