"""The HTTP layer: routes, authentication, limits, error answers and metrics (Starlette).

Handlers parse and tokenize a request (tokenization in a worker thread),
queue its sequences with the scheduler, and wait for the rows, or for the
client to go away, whichever comes first. Nothing here touches the model
except through the scheduler's one thread.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..cli import _records
from ..model import RewardOutput
from .inputs import (DEFAULT_MAX_BODY_BYTES, Encoder, Item, RequestError, openrlhf_items, optional_bool,
                     pooling_items, schema_error, score_items)
from .metrics import CONTENT_TYPE_LATEST, Metrics
from .scheduler import (DEFAULT_MAX_BATCH_TOKENS, DEFAULT_MAX_QUEUE_TOKENS, DEFAULT_MAX_WAIT_MS, BatchFailed,
                        QueueFull, Scheduler, Stopped, TooLarge)



def _usage(tokens: int) -> Dict[str, Any]:
    return {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0, "prompt_tokens_details": None}


def _error_body(status: int, message: str, param: Optional[str], kind: str) -> Dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


class _Server:
    """Everything one app holds: the model, its encoder, the scheduler and the metrics."""

    def __init__(self, model: Any, names: List[str], max_batch_tokens: int, max_wait_ms: float,
                 max_queue_tokens: int, max_length: Optional[int], api_key: Optional[str],
                 max_body_bytes: int) -> None:
        if "score" not in self._fields_of(model):
            raise ValueError(f"{model.name_or_path}: a {model.architecture} has no reward head; armorm serve "
                             "needs an ArmoRM (*ForRewardModelWithGating) or a *ForSequenceClassification "
                             "checkpoint")
        limit = model.config.max_position_embeddings
        if max_length is None:
            max_length = limit
        if not 1 <= int(max_length) <= limit:
            raise ValueError(f"max_length must be in 1..{limit} (the model's max_position_embeddings), "
                             f"got {max_length}")
        if max_body_bytes < 1:
            raise ValueError("max_body_bytes must be positive")
        self.model = model
        self.names = names
        self.max_length = int(max_length)
        self.api_key = api_key
        self.max_body_bytes = int(max_body_bytes)
        self.encoder = Encoder(model, self.max_length)
        self.fields = self._fields_of(model)
        self.id2label = model.config.raw.get("id2label") or {}
        self.metrics = Metrics()
        self.scheduler = Scheduler(self._engine, max_batch_tokens=max_batch_tokens, max_wait_ms=max_wait_ms,
                                   max_queue_tokens=max_queue_tokens, stats=self.metrics)
        self.metrics.watch(self.scheduler)

    @staticmethod
    def _fields_of(model: Any) -> List[str]:
        if model.config.kind == "armorm" and model.config.core["compute_head"]:
            return ["score", "rewards", "gating_output"]
        if model.config.kind == "seqcls" and model.config.core["compute_head"]:
            return ["score", "logits"]
        return []

    def _engine(self, seqs: List[np.ndarray]) -> Mapping[str, np.ndarray]:
        total = int(sum(s.size for s in seqs))
        out = self.model.score_sequences(seqs, fields=self.fields, batch_tokens=max(1, total))
        return {f: np.asarray(out[f]) for f in self.fields}

    # ---- plumbing shared by the routes -------------------------------------

    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise RequestError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                               kind="unauthorized", headers={"WWW-Authenticate": "Bearer"})

    async def read_json(self, request: Request) -> Dict[str, Any]:
        limit = self.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise RequestError(413, f"the request body has {declared} bytes, more than the server takes "
                                    f"({limit}; --max-body-bytes)", kind="body_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise RequestError(413, f"the request body is larger than the server takes ({limit} bytes; "
                                        "--max-body-bytes)", kind="body_too_large")
        try:
            data = json.loads(bytes(body).decode("utf-8"))
        except UnicodeDecodeError as e:
            raise RequestError(400, f"the body is not UTF-8 (byte {e.start})", kind="malformed_json") from None
        except json.JSONDecodeError as e:
            raise RequestError(400, f"the body is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})",
                               kind="malformed_json") from None
        except RecursionError:
            raise RequestError(400, "the body's JSON is nested too deeply", kind="malformed_json") from None
        if not isinstance(data, dict):
            raise schema_error(f"the body must be a JSON object, got {type(data).__name__}")
        return data

    def check_model(self, body: Mapping[str, Any]) -> str:
        name = body.get("model")
        if name is None:
            return self.names[0]
        if not isinstance(name, str) or name not in self.names:
            raise RequestError(404, f"the model {name!r} does not exist here; this server serves "
                                    f"{', '.join(repr(n) for n in self.names)}", param="model",
                               kind="unknown_model")
        return name

    def encode(self, items: Sequence[Item], add_special_tokens: bool) -> List[np.ndarray]:
        return [self.encoder.encode(it, add_special_tokens) for it in items]

    async def wait(self, job: Any, request: Request) -> Optional[Dict[str, np.ndarray]]:
        """The job's rows, or None when the client went away first (its queued work is dropped)."""
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({job.future, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if job.future.done():
            try:
                return job.future.result()
            except BatchFailed as e:
                raise RequestError(500, str(e), kind="batch_failed") from None
        self.scheduler.cancel(job)
        job.future.cancel()
        return None

    def vector(self, result: Mapping[str, np.ndarray], i: int) -> np.ndarray:
        """The per-sequence output vector vLLM-style clients read: [score] (ArmoRM) or the logits."""
        return result["logits"][i] if "logits" in result else result["score"][i:i + 1]


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _floats(v: np.ndarray, where: str) -> List[float]:
    if not np.all(np.isfinite(v)):
        raise RequestError(500, f"{where}: the model produced a non-finite value", param=where,
                           kind="non_finite_output")
    return [float(x) for x in v]


def _activate(v: np.ndarray) -> np.ndarray:
    """vLLM's classifier activation: sigmoid for one class, softmax for several."""
    x = v.astype(np.float64)
    if x.size < 2:
        return 1.0 / (1.0 + np.exp(-x))
    e = np.exp(x - x.max())
    return e / e.sum()


# ---- the endpoints -----------------------------------------------------------
#
# Each scored endpoint is (items, options, answer): items(body) lists the inputs,
# options(body) checks the endpoint's own fields before anything is queued, and
# answer(server, name, options, seqs, result) builds the JSON.


def _no_options(body: Mapping[str, Any]) -> Dict[str, Any]:
    return {}


def _pooling_options(body: Mapping[str, Any]) -> Dict[str, Any]:
    if body.get("truncate_prompt_tokens") not in (None, -1):
        raise RequestError(400, "truncate_prompt_tokens is not supported: a truncated conversation loses its "
                                "final assistant turn; send the sequence whole (at most --max-length tokens)",
                           param="truncate_prompt_tokens")
    fmt = body.get("encoding_format")
    if fmt not in (None, "float"):
        raise RequestError(400, f"encoding_format {fmt!r} is not supported; use 'float'", param="encoding_format")
    act = optional_bool(body, "use_activation", "activation")  # 'activation': the name before vLLM 0.11.2
    special = optional_bool(body, "add_special_tokens")
    return {"use_activation": True if act is None else act,
            "add_special_tokens": True if special is None else special}


def _score_options(body: Mapping[str, Any]) -> Dict[str, Any]:
    k = body.get("top_k", 3)
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise schema_error("'top_k' must be an integer >= 0", "top_k")
    return {"top_k": k}


def _answer_openrlhf(srv: _Server, name: str, opt: Dict[str, Any], seqs: List[np.ndarray],
                     res: Dict[str, np.ndarray]) -> Dict[str, Any]:
    scores = _floats(res["score"], "query")
    logs: Dict[str, List[float]] = {}
    if "rewards" in res:
        for j, attr in enumerate(srv.model.attributes[:res["rewards"].shape[1]]):
            logs[attr] = _floats(res["rewards"][:, j], "query")
    return {"rewards": scores, "scores": scores, "extra_logs": logs}


def _answer_classify(srv: _Server, name: str, opt: Dict[str, Any], seqs: List[np.ndarray],
                     res: Dict[str, np.ndarray]) -> Dict[str, Any]:
    data = []
    for i in range(len(seqs)):
        v = srv.vector(res, i)
        probs = _activate(v) if opt["use_activation"] else v
        data.append({"index": i, "label": srv.id2label.get(str(int(np.argmax(probs)))),
                     "probs": _floats(probs, f"input[{i}]"), "num_classes": int(v.size)})
    return {"id": f"classify-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()), "model": name,
            "data": data, "usage": _usage(int(sum(s.size for s in seqs)))}


def _answer_pooling(srv: _Server, name: str, opt: Dict[str, Any], seqs: List[np.ndarray],
                    res: Dict[str, np.ndarray]) -> Dict[str, Any]:
    data = []
    for i in range(len(seqs)):
        v = srv.vector(res, i)
        data.append({"index": i, "object": "pooling",
                     "data": _floats(_activate(v) if opt["use_activation"] else v, f"input[{i}]")})
    return {"id": f"pool-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()), "model": name,
            "data": data, "usage": _usage(int(sum(s.size for s in seqs)))}


def _answer_embeddings(srv: _Server, name: str, opt: Dict[str, Any], seqs: List[np.ndarray],
                       res: Dict[str, np.ndarray]) -> Dict[str, Any]:
    # SGLang returns a classification model's raw outputs (no activation) as the embedding
    data = [{"object": "embedding", "index": i, "embedding": _floats(srv.vector(res, i), f"input[{i}]")}
            for i in range(len(seqs))]
    return {"id": f"embd-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()), "model": name,
            "data": data, "usage": _usage(int(sum(s.size for s in seqs)))}


def _answer_score(srv: _Server, name: str, opt: Dict[str, Any], seqs: List[np.ndarray],
                  res: Dict[str, np.ndarray]) -> Dict[str, Any]:
    _floats(res["score"], "conversations")
    out = RewardOutput(**res)
    explained = srv.model.explain(out, opt["top_k"]) if "gating_output" in res else [[] for _ in seqs]
    recs = _records(out, srv.model.attributes, explained, [None] * len(seqs))
    data = [dict(index=i, tokens=int(s.size), **r) for i, (s, r) in enumerate(zip(seqs, recs))]
    return {"object": "list", "model": name, "data": data, "usage": _usage(int(sum(s.size for s in seqs)))}


_ENDPOINTS: Dict[str, tuple] = {
    "get_reward": (openrlhf_items, _no_options, _answer_openrlhf),
    "classify": (pooling_items, _pooling_options, _answer_classify),
    "pooling": (pooling_items, _pooling_options, _answer_pooling),
    "embeddings": (pooling_items, _pooling_options, _answer_embeddings),
    "score": (score_items, _score_options, _answer_score),
}


def _error_response(e: RequestError) -> JSONResponse:
    return JSONResponse(_error_body(e.status, e.message, e.param, e.kind), status_code=e.status, headers=e.headers)


def create_app(model: Any, *, served_model_name: Union[None, str, Sequence[str]] = None,
               max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS, max_wait_ms: float = DEFAULT_MAX_WAIT_MS,
               max_queue_tokens: int = DEFAULT_MAX_QUEUE_TOKENS, max_length: Optional[int] = None,
               api_key: Optional[str] = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> Starlette:
    """The reward server for a loaded `armorm.ArmoRM` as an ASGI app (run it with uvicorn).

    `served_model_name`: the name(s) requests may give in `model` (default:
    the model's path). `max_batch_tokens`: tokens per engine call.
    `max_wait_ms`: how long a lone request waits for others to batch with.
    `max_queue_tokens`: tokens that may wait; beyond, 503 + Retry-After.
    `max_length`: longest sequence accepted (default: the model's
    max_position_embeddings). `api_key`: required as `Authorization: Bearer
    KEY` on every route but /health. `max_body_bytes`: larger bodies get 413.
    The app owns a scheduler thread, stopped at the app's shutdown
    (`app.state.armorm.scheduler.stop()` when the app is used without a
    lifespan).
    """
    if served_model_name is None:
        names = [model.name_or_path]
    elif isinstance(served_model_name, str):
        names = [served_model_name]
    else:
        names = [str(n) for n in served_model_name]
    if not names:
        raise ValueError("served_model_name must name at least one model")
    srv = _Server(model, names, max_batch_tokens, max_wait_ms, max_queue_tokens, max_length, api_key,
                  max_body_bytes)

    def scored(endpoint: str) -> Callable:
        items_of, options_of, answer = _ENDPOINTS[endpoint]

        async def handler(request: Request) -> Response:
            start = time.monotonic()
            srv.metrics.in_flight.inc()
            code = 500
            try:
                srv.authorize(request)
                body = await srv.read_json(request)
                name = srv.check_model(body)
                items = items_of(body)
                opt = options_of(body)
                seqs = await run_in_threadpool(srv.encode, items, opt.get("add_special_tokens", True))
                try:
                    job = srv.scheduler.submit(seqs)
                except QueueFull as e:
                    raise RequestError(503, str(e), kind="queue_full",
                                       headers={"Retry-After": str(e.retry_after)}) from None
                except TooLarge as e:
                    raise RequestError(413, str(e), kind="request_too_large") from None
                except Stopped as e:
                    raise RequestError(503, str(e), kind="shutting_down", headers={"Retry-After": "1"}) from None
                result = await srv.wait(job, request)
                if result is None:
                    code = 499  # nginx's "client closed request": nobody reads this answer
                    srv.metrics.errors.labels(kind="client_disconnected").inc()
                    return Response(status_code=code)
                payload = answer(srv, name, opt, seqs, result)
                tokens = int(sum(s.size for s in seqs))
                srv.metrics.sequences.labels(endpoint=endpoint).inc(len(seqs))
                srv.metrics.tokens.labels(endpoint=endpoint).inc(tokens)
                code = 200
                return JSONResponse(payload)
            except RequestError as e:
                code = e.status
                srv.metrics.errors.labels(kind=e.kind).inc()
                return _error_response(e)
            except ClientDisconnect:
                code = 499
                srv.metrics.errors.labels(kind="client_disconnected").inc()
                return Response(status_code=code)
            finally:
                srv.metrics.in_flight.dec()
                srv.metrics.requests.labels(endpoint=endpoint, code=str(code)).inc()
                srv.metrics.latency.labels(endpoint=endpoint).observe(time.monotonic() - start)

        return handler

    def guarded(endpoint: str, fn: Callable[[Request], Response]) -> Callable:
        async def handler(request: Request) -> Response:
            try:
                srv.authorize(request)
            except RequestError as e:
                srv.metrics.errors.labels(kind=e.kind).inc()
                srv.metrics.requests.labels(endpoint=endpoint, code=str(e.status)).inc()
                return _error_response(e)
            srv.metrics.requests.labels(endpoint=endpoint, code="200").inc()
            return fn(request)

        return handler

    def models(request: Request) -> Response:
        created = int(time.time())
        return JSONResponse({"object": "list", "data": [
            {"id": n, "object": "model", "created": created, "owned_by": "armorm", "root": model.name_or_path,
             "parent": None, "max_model_len": srv.max_length} for n in names]})

    def metrics(request: Request) -> Response:
        return Response(srv.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        yield
        # the ASGI server has finished every request by now: drain whatever is left and end the thread
        await run_in_threadpool(srv.scheduler.stop)

    routes = [
        Route("/get_reward", scored("get_reward"), methods=["POST"]),
        Route("/classify", scored("classify"), methods=["POST"]),
        Route("/v1/classify", scored("classify"), methods=["POST"]),
        Route("/pooling", scored("pooling"), methods=["POST"]),
        Route("/v1/embeddings", scored("embeddings"), methods=["POST"]),
        Route("/v1/score", scored("score"), methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", guarded("models", models), methods=["GET"]),
        Route("/metrics", guarded("metrics", metrics), methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.armorm = srv
    return app
