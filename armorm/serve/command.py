"""The `armorm serve` subcommand: its options and what it runs.

Importable without the serve extra (the CLI builds every parser at start);
the server itself is imported only when the command runs.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable

from ..hub import DEFAULT_MODEL
from ..model import PREPACK_SETTINGS
from .inputs import DEFAULT_MAX_BODY_BYTES
from .scheduler import DEFAULT_MAX_BATCH_TOKENS, DEFAULT_MAX_QUEUE_TOKENS, DEFAULT_MAX_WAIT_MS


def _number(kind: Callable[[str], Any], lo: float) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not lo <= v < float("inf"):
            raise argparse.ArgumentTypeError(f"must be a finite number >= {lo}, got {text}")
        return v
    return parse


def add_parser(sub: Any) -> None:
    """Registers `armorm serve` on the CLI's subparsers."""
    s = sub.add_parser(
        "serve", help="serve the reward model over HTTP (OpenRLHF, vLLM- and SGLang-style clients)",
        description="Serves one reward model over HTTP: POST /get_reward (OpenRLHF), /classify and /pooling "
                    "(vLLM), /v1/embeddings (SGLang), /v1/score (every field); GET /health, /v1/models, "
                    "/metrics. Requests from all clients are batched together. SIGTERM finishes the requests "
                    "in flight and exits 0. See docs/serving.md.")
    s.add_argument("--model", metavar="DIR", default=DEFAULT_MODEL,
                   help=f"model directory or hub id in the local cache (default: {DEFAULT_MODEL})")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; 0.0.0.0 for every interface (default: 127.0.0.1)")
    s.add_argument("--port", type=_number(int, 0), default=8000, help="port; 0 picks a free one (default: 8000)")
    s.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    s.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16", "auto"],
                   help="dtype the weights are held in; auto keeps the stored dtype (default: bfloat16)")
    s.add_argument("--prepack", default="auto", choices=list(PREPACK_SETTINGS),
                   help="hold the matrices in the CPU kernel's packed layout from load on: a lone short request "
                        "then reads each weight once instead of repacking it; auto where that takes no more "
                        "memory, on / off always / never (docs/model.md, 'Prepacked weights') (default: auto)")
    s.add_argument("--threads", type=_number(int, 1), default=None,
                   help="CPU threads for the model (default: $ARMORM_NUM_THREADS, else every usable core)")
    s.add_argument("--max-batch-tokens", type=_number(int, 1), default=DEFAULT_MAX_BATCH_TOKENS,
                   help=f"tokens scored per batch; a longer sequence runs alone (default: {DEFAULT_MAX_BATCH_TOKENS})")
    s.add_argument("--max-wait-ms", type=_number(float, 0), default=DEFAULT_MAX_WAIT_MS,
                   help="how long a request waits for others to batch with when the queue holds less than a "
                        f"batch (default: {DEFAULT_MAX_WAIT_MS})")
    s.add_argument("--max-queue-tokens", type=_number(int, 1), default=DEFAULT_MAX_QUEUE_TOKENS,
                   help="tokens that may wait; more gets 503 with Retry-After "
                        f"(default: {DEFAULT_MAX_QUEUE_TOKENS})")
    s.add_argument("--max-length", type=_number(int, 1), default=None,
                   help="longest sequence accepted, in tokens; longer ones get 400 "
                        "(default: the model's max_position_embeddings)")
    s.add_argument("--max-body-bytes", type=_number(int, 1), default=DEFAULT_MAX_BODY_BYTES,
                   help=f"largest request body; larger gets 413 (default: {DEFAULT_MAX_BODY_BYTES})")
    s.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every route but /health "
                        "(default: $ARMORM_API_KEY, else no key)")
    s.add_argument("--served-model-name", nargs="+", metavar="NAME", default=None,
                   help="names a request's 'model' field may give (default: --model as given)")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="server log level (default: info)")
    s.add_argument("--access-log", action="store_true", help="log every request (default: off)")
    s.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    """Runs `armorm serve` with parsed arguments; returns the exit status."""
    from ..hub import ModelNotFoundError, resolve_model_path
    try:
        from .server import run
    except ImportError as e:
        print(f"armorm: error: armorm serve needs the 'serve' extra ({e.name or e} is missing): "
              "pip install \"armorm[serve]\"", file=sys.stderr)
        return 2
    try:
        path = resolve_model_path(args.model)
    except ModelNotFoundError as e:
        print(f"armorm: error: {e}; pass a local copy with --model DIR", file=sys.stderr)
        return 2
    try:
        api_key = args.api_key if args.api_key is not None else os.environ.get("ARMORM_API_KEY") or None
        run(path, host=args.host, port=args.port, device=args.device, dtype=args.dtype, threads=args.threads,
            prepack=PREPACK_SETTINGS[args.prepack],
            served_model_name=args.served_model_name or [args.model], log_level=args.log_level,
            access_log=args.access_log, max_batch_tokens=args.max_batch_tokens, max_wait_ms=args.max_wait_ms,
            max_queue_tokens=args.max_queue_tokens, max_length=args.max_length, api_key=api_key,
            max_body_bytes=args.max_body_bytes)
    except OSError as e:
        print(f"armorm: error: {e}", file=sys.stderr)
        return 2
    return 0
