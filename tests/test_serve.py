"""`armorm serve` over real HTTP.

Most tests start the server as users do (`armorm serve` in a subprocess, on a
free port of 127.0.0.1) and talk to it with aiohttp, the client OpenRLHF and
verl use, building requests and reading answers the way those clients do.
Tests of scheduling order (batching, FIFO, a client leaving, a failing batch,
a full queue, shutdown) run the same app in-process, on uvicorn in a thread,
around a model whose scoring waits on an event: they prove the order of
events, never a time. Timeouts are only guards against hangs.

Every score is compared for equality with offline `score_sequences` on the
same tokens.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import pytest

aiohttp = pytest.importorskip("aiohttp")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

import armorm  # noqa: E402
from armorm.tokenizer import format_conversations  # noqa: E402
from checkpoints import make_armorm  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HANG = 120.0          # guard against hangs only; nothing is asserted about time
API_KEY = "test-key-7f3a"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_LENGTH = 1536
MAX_BODY = 200_000
EOT = "<|eot_id|>"
BOS = "<|begin_of_text|>"

WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at which but have an "
         "they you were her she there can all their one been has more if will would we so no some what when up "
         "out about into than them could only other new time these two may then do first any like now my such "
         "answer synonym beautiful lovely stunning gorgeous pretty elegant code python list print error value").split()


def _text(rng: np.random.Generator, n: int) -> str:
    return " ".join(rng.choice(WORDS, size=n))


def conversation(rng: np.random.Generator, n_prompt: int, n_response: int, turns: int = 1) -> List[Dict[str, str]]:
    msgs = []
    for t in range(turns):
        msgs.append({"role": "user", "content": _text(rng, n_prompt)})
        msgs.append({"role": "assistant", "content": _text(rng, n_response)})
    return msgs


# ---- fixtures -------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, llama3_dir) -> Path:
    d = tmp_path_factory.mktemp("serve") / "ArmoRM-tiny"
    make_armorm(d, vocab=128257, pad_token_id=128256, hidden=32, heads=4, kv_heads=2, inter=64, layers=2,
                gating_hidden=16, max_pos=2048)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (llama3_dir / f).exists():
            shutil.copy(llama3_dir / f, d / f)
    return d


@pytest.fixture(scope="module")
def ref(model_dir):
    """The offline reference: the same checkpoint in-process, fp32 (as the servers here load it)."""
    m = armorm.ArmoRM.from_pretrained(model_dir, torch_dtype="float32")
    yield m
    m.close()


def offline(ref, seqs: List[List[int]]) -> Any:
    return ref.score_sequences([np.asarray(s, dtype=np.int32) for s in seqs])


def chat_ids(ref, msgs) -> List[int]:
    return format_conversations(ref.tokenizer, [msgs])[0]


class CLIServer:
    """`armorm serve` in a subprocess; its stderr goes to a file (never a pipe that could fill)."""

    def __init__(self, model_dir: Path, log: Path, *extra: str) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        self.log_path = log
        self._log = open(log, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "armorm.cli", "serve", "--model", str(model_dir),
                                      "--port", "0", "--dtype", "float32", *extra],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
        deadline = time.monotonic() + HANG
        while True:
            text = log.read_text(errors="replace")
            m = re.search(r"listening on (http://127\.0\.0\.1:\d+)", text)
            if m:
                self.url = m.group(1)
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"armorm serve did not start:\n{text}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(HANG)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    s = CLIServer(model_dir, tmp_path_factory.mktemp("log") / "serve.log", "--api-key", API_KEY,
                  "--max-length", str(MAX_LENGTH), "--max-body-bytes", str(MAX_BODY),
                  "--served-model-name", "armorm-tiny", str(model_dir))
    yield s
    s.stop()
    assert s.proc.returncode == 0, s.log_path.read_text()


async def post(session, url: str, payload: Any, headers: Optional[Dict[str, str]] = None, raw: Optional[bytes] = None):
    """(status, parsed JSON or None, headers)."""
    kw = {"data": raw} if raw is not None else {"json": payload}
    async with session.post(url, headers={**AUTH, **(headers or {})}, **kw) as r:
        text = await r.text()
        try:
            body = json.loads(text)
        except json.JSONDecodeError:
            body = None
        return r.status, body, r.headers


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, HANG))


async def metrics(session, url: str) -> Dict[str, float]:
    async with session.get(url + "/metrics", headers=AUTH) as r:
        assert r.status == 200
        text = await r.text()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


# ---- client-shaped requests ------------------------------------------------------


def openrlhf_query(hf_tok, msgs) -> str:
    """The text OpenRLHF posts: decode(prompt ids + generated ids) with special tokens as text."""
    prompt = hf_tok.apply_chat_template(msgs[:-1], add_generation_prompt=True, tokenize=False)
    prompt_ids = hf_tok(prompt, add_special_tokens=False)["input_ids"]
    response_ids = hf_tok(msgs[-1]["content"], add_special_tokens=False)["input_ids"] + [hf_tok.eos_token_id]
    return hf_tok.decode(prompt_ids + response_ids, skip_special_tokens=False)


def verl_text(hf_tok, msgs) -> str:
    """The text verl's reward loop posts: the chat template rendered, its leading BOS text removed."""
    text = hf_tok.apply_chat_template(msgs, add_generation_prompt=False, tokenize=False)
    return text[len(hf_tok.bos_token):] if text.startswith(hf_tok.bos_token) else text


@pytest.fixture(scope="module")
def hf_tok(model_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(model_dir))


async def openrlhf_fetch(url: str, query: str, prompt: str, label: Any) -> Dict[str, Any]:
    """OpenRLHF's `_fetch_rewards_via_http` for one sample: its session, timeout and parsing."""
    timeout = aiohttp.ClientTimeout(total=HANG)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.post(url, json={"query": [query], "prompts": [prompt], "labels": [label]},
                                headers=AUTH) as response:
            response.raise_for_status()
            info = await response.json()
    score = info.get("scores")
    if score is None:
        score = info.get("rewards")
    return {"reward": info.get("rewards"), "scores": score, "extra_logs": info.get("extra_logs") or {}}


# ---- endpoint shapes and scores --------------------------------------------------


def test_openrlhf_get_reward(server, ref, hf_tok):
    rng = np.random.default_rng(1)
    convs = [conversation(rng, 20, 40), conversation(rng, 5, 200), conversation(rng, 30, 10, turns=2)]
    expected = offline(ref, [chat_ids(ref, c) for c in convs])
    url = server.url + "/get_reward"

    async def main():
        outs = [await openrlhf_fetch(url, openrlhf_query(hf_tok, c), c[0]["content"], None) for c in convs]
        # the same conversation, spelled the ways clients send it: without BOS, with trailing pad/eos
        q = openrlhf_query(hf_tok, convs[0])
        variants = [q[len(BOS):], q + EOT + EOT, q + EOT]
        outs_v = [await openrlhf_fetch(url, v, "", None) for v in variants]
        async with aiohttp.ClientSession() as s:
            many = await post(s, url, {"query": [openrlhf_query(hf_tok, c) for c in convs]})
        return outs, outs_v, many

    outs, outs_v, (status, body, headers) = run(main())
    for i, out in enumerate(outs):
        assert out["scores"] == [float(expected.score[i])] and out["reward"] == out["scores"]
        logs = out["extra_logs"]
        assert list(logs) == armorm.ATTRIBUTES
        assert [v[0] for v in logs.values()] == [float(x) for x in expected.rewards[i]]
    for out in outs_v:
        assert out["scores"] == [float(expected.score[0])]
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert body["rewards"] == [float(x) for x in expected.score] == body["scores"]


def test_vllm_classify_as_verl_calls_it(server, ref, hf_tok):
    rng = np.random.default_rng(2)
    convs = [conversation(rng, 15, 60), conversation(rng, 40, 8)]
    ids = [chat_ids(ref, c) for c in convs]
    expected = offline(ref, ids)

    async def main():
        async with aiohttp.ClientSession() as s:
            outs = []
            for c in convs:
                for flag in ({"activation": False}, {"use_activation": False}):  # before / after vLLM 0.11.2
                    outs.append(await post(s, server.url + "/classify",
                                           {"model": str(server_model_dir(server)), "input": verl_text(hf_tok, c),
                                            **flag}))
            act = await post(s, server.url + "/classify",
                             {"model": "armorm-tiny", "input": verl_text(hf_tok, convs[0])})
            batch = await post(s, server.url + "/classify", {"input": [verl_text(hf_tok, c) for c in convs],
                                                             "use_activation": False})
            tokens = await post(s, server.url + "/classify", {"input": ids[1], "use_activation": False})
            msgs = await post(s, server.url + "/classify", {"messages": convs[1], "use_activation": False})
            return outs, act, batch, tokens, msgs

    outs, act, batch, tokens, msgs = run(main())
    for k, (status, body, _) in enumerate(outs):
        assert status == 200, body
        assert body["data"][-1]["probs"][-1] == float(expected.score[k // 2])   # what verl reads
        assert body["id"].startswith("classify-") and body["object"] == "list" and isinstance(body["created"], int)
        assert body["data"] == [{"index": 0, "label": "LABEL_0", "probs": [float(expected.score[k // 2])],
                                 "num_classes": 1}]
        n = len(ids[k // 2])  # one BOS: verl removed the BOS text, the server put it back once
        assert body["usage"] == {"prompt_tokens": n, "total_tokens": n, "completion_tokens": 0,
                                 "prompt_tokens_details": None}
    status, body, _ = act
    s0 = float(expected.score[0])
    assert status == 200 and body["model"] == "armorm-tiny"
    assert body["data"][0]["probs"][0] == pytest.approx(1 / (1 + math.exp(-s0)), rel=1e-12)  # vLLM: sigmoid
    status, body, _ = batch
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert [d["probs"][0] for d in body["data"]] == [float(x) for x in expected.score]
    for status, body, _ in (tokens, msgs):
        assert status == 200 and body["data"][0]["probs"] == [float(expected.score[1])]


def server_model_dir(server: CLIServer) -> str:
    """The model directory the server was started with (also a served name)."""
    return server.proc.args[server.proc.args.index("--model") + 1]


def test_sglang_embeddings_and_vllm_pooling(server, ref, hf_tok):
    rng = np.random.default_rng(3)
    convs = [conversation(rng, 25, 35), conversation(rng, 3, 120)]
    expected = offline(ref, [chat_ids(ref, c) for c in convs])

    async def main():
        async with aiohttp.ClientSession() as s:
            emb = [await post(s, server.url + "/v1/embeddings", {"model": "armorm-tiny", "input": verl_text(hf_tok, c)})
                   for c in convs]
            pool = await post(s, server.url + "/pooling", {"input": [verl_text(hf_tok, c) for c in convs],
                                                           "use_activation": False})
            return emb, pool

    emb, pool = run(main())
    for i, (status, body, _) in enumerate(emb):
        assert status == 200, body
        assert body["data"][-1]["embedding"][-1] == float(expected.score[i])   # what verl reads
        assert body["object"] == "list" and body["model"] == "armorm-tiny"
        assert body["data"] == [{"object": "embedding", "index": 0, "embedding": [float(expected.score[i])]}]
        assert body["usage"]["prompt_tokens"] == len(chat_ids(ref, convs[i]))
    status, body, _ = pool
    assert status == 200 and body["id"].startswith("pool-")
    assert body["data"] == [{"index": i, "object": "pooling", "data": [float(expected.score[i])]} for i in range(2)]


def test_v1_score_every_field(server, ref):
    rng = np.random.default_rng(4)
    convs = [conversation(rng, 10, 30), conversation(rng, 50, 5, turns=3)]
    expected = offline(ref, [chat_ids(ref, c) for c in convs])
    top = ref.explain(expected, 4)

    async def main():
        async with aiohttp.ClientSession() as s:
            one = await post(s, server.url + "/v1/score", {"messages": convs[1]})
            both = await post(s, server.url + "/v1/score", {"conversations": convs, "top_k": 4})
            return one, both

    (status1, one, _), (status2, both, _) = run(main())
    assert status1 == 200 and status2 == 200
    assert one["data"][0]["score"] == float(expected.score[1])
    assert len(one["data"][0]["top_objectives"]) == 3
    for i, d in enumerate(both["data"]):
        assert d["index"] == i and d["tokens"] == len(chat_ids(ref, convs[i]))
        assert d["score"] == float(expected.score[i])
        assert d["rewards"] == {a: float(v) for a, v in zip(armorm.ATTRIBUTES, expected.rewards[i])}
        assert d["gating_output"] == {a: float(v) for a, v in zip(armorm.ATTRIBUTES, expected.gating_output[i])}
        assert d["top_objectives"] == [{"objective": a, "coefficient": c} for a, c in top[i]]
    assert both["usage"]["prompt_tokens"] == sum(d["tokens"] for d in both["data"])


def test_models_health_metrics_and_auth(server):
    async def main():
        async with aiohttp.ClientSession() as s:
            async with s.get(server.url + "/health") as r:          # no key needed
                health = (r.status, await r.json())
            async with s.get(server.url + "/v1/models", headers=AUTH) as r:
                models = (r.status, await r.json())
            denied = []
            for method, path in (("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/get_reward"),
                                 ("POST", "/classify"), ("POST", "/pooling"), ("POST", "/v1/embeddings"),
                                 ("POST", "/v1/score")):
                for hdr in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
                    async with s.request(method, server.url + path, headers=hdr, json={"input": "x"}) as r:
                        denied.append((path, r.status, r.headers.get("WWW-Authenticate"), await r.json()))
            m = await metrics(s, server.url)
            return health, models, denied, m

    health, models, denied, m = run(main())
    assert health == (200, {"status": "ok"})
    status, body = models
    assert status == 200 and body["object"] == "list"
    assert [d["id"] for d in body["data"]] == ["armorm-tiny", server_model_dir(server)]
    assert all(d["object"] == "model" and d["max_model_len"] == MAX_LENGTH for d in body["data"])
    for path, status, www, err in denied:
        assert (status, www) == (401, "Bearer"), path
        assert "API key" in err["error"]["message"]
    assert m['armorm_errors_total{kind="unauthorized"}'] >= 21
    for name in ("armorm_queue_tokens", "armorm_queue_sequences", "armorm_requests_in_flight", "armorm_engine_busy"):
        assert name in m
    assert any(k.startswith("armorm_request_latency_seconds_bucket") for k in m)
    assert any(k.startswith("armorm_batch_sequences_bucket") for k in m)


# ---- many clients ------------------------------------------------------------------


def test_64_concurrent_clients_get_offline_scores(server, ref, hf_tok):
    rng = np.random.default_rng(5)
    convs = [conversation(rng, int(rng.integers(5, 200)), int(rng.integers(5, 600))) for _ in range(64)]
    expected = offline(ref, [chat_ids(ref, c) for c in convs])
    queries = [openrlhf_query(hf_tok, c) for c in convs]

    async def main():
        async with aiohttp.ClientSession() as s:
            before = await metrics(s, server.url)
        outs = await asyncio.gather(*[openrlhf_fetch(server.url + "/get_reward", q, "", None) for q in queries])
        async with aiohttp.ClientSession() as s:
            after = await metrics(s, server.url)
        return outs, before, after

    outs, before, after = run(main())
    assert [o["scores"][0] for o in outs] == [float(x) for x in expected.score]
    key = 'armorm_request_sequences_total{endpoint="get_reward"}'
    assert after[key] - before.get(key, 0) == 64


# ---- faults -------------------------------------------------------------------------


def test_bad_requests_name_the_item(server, ref, hf_tok):
    rng = np.random.default_rng(6)
    good = conversation(rng, 10, 10)
    long_conv = conversation(rng, 10, MAX_LENGTH)  # over --max-length
    ends_with_user = good + [{"role": "user", "content": "and?"}]
    text_good = verl_text(hf_tok, good)
    text_user_last = verl_text(hf_tok, ends_with_user)
    url = server.url

    cases = [
        ("/get_reward", None, b'{"query": ["abc"', 400, None, "not valid JSON"),
        ("/get_reward", None, b"\xff\xfe", 400, None, "not UTF-8"),
        ("/get_reward", [1, 2], None, 422, None, "JSON object"),
        ("/get_reward", {"queries": ["x"]}, None, 422, "query", "missing field 'query'"),
        ("/get_reward", {"query": [text_good, 7]}, None, 422, "query[1]", "must be a string"),
        ("/get_reward", {"query": [text_good, "no chat format here"]}, None, 400, "query[1]",
         "no final assistant turn"),
        ("/get_reward", {"query": [text_good, text_user_last]}, None, 400, "query[1]",
         "continues after its last assistant turn"),
        ("/classify", {"model": "other-model", "input": text_good}, None, 404, "model", "does not exist"),
        ("/classify", {"input": [text_good, text_good, verl_text(hf_tok, long_conv)]}, None, 400, "input[2]",
         f"more than the server's --max-length {MAX_LENGTH}"),
        ("/classify", {"input": [5, 128257]}, None, 400, "input", "outside the vocabulary"),
        ("/classify", {"input": [[5, 6], [True]]}, None, 422, "input[1]", "integers only"),
        ("/classify", {"input": []}, None, 422, "input", "non-empty"),
        ("/classify", {"input": text_good, "truncate_prompt_tokens": 10}, None, 400, "truncate_prompt_tokens",
         "not supported"),
        ("/v1/embeddings", {"input": text_good, "encoding_format": "base64"}, None, 400, "encoding_format",
         "not supported"),
        ("/v1/score", {"conversations": [good, ends_with_user]}, None, 400, "conversations[1]",
         "the last message must be the assistant's"),
        ("/v1/score", {"conversations": [good, [{"role": "assistant"}]]}, None, 422, "conversations[1]",
         "has no 'content'"),
        ("/v1/score", {"conversation": good}, None, 422, "messages", "missing field"),
        ("/v1/score", {"messages": good, "top_k": -1}, None, 422, "top_k", "top_k"),
    ]

    async def main():
        async with aiohttp.ClientSession() as s:
            before = await metrics(s, url)
            outs = [await post(s, url + path, payload, raw=raw) for path, payload, raw, *_ in cases]
            after = await metrics(s, url)
            return outs, before, after

    outs, before, after = run(main())
    for case, (status, body, _) in zip(cases, outs):
        path, _, _, want_status, param, words = case
        assert status == want_status, (case, body)
        assert body["error"]["code"] == status and body["error"]["param"] == param, (case, body)
        if words:
            assert words in body["error"]["message"], (case, body)
    # a refused request scores nothing: no item of a failed list was computed
    tok = 'armorm_request_tokens_total{endpoint="classify"}'
    assert after.get(tok, 0) == before.get(tok, 0)
    assert after['armorm_errors_total{kind="too_long"}'] - before.get('armorm_errors_total{kind="too_long"}', 0) == 1


def test_oversized_body_413(server):
    big = {"query": ["x" * (MAX_BODY + 10)]}

    async def main():
        async with aiohttp.ClientSession() as s:
            declared = await post(s, server.url + "/get_reward", big)
            raw = json.dumps(big).encode()

            async def chunks():          # no Content-Length: the server counts as it reads
                for i in range(0, len(raw), 65536):
                    yield raw[i:i + 65536]
            async with s.post(server.url + "/get_reward", data=chunks(), headers=AUTH) as r:
                streamed = (r.status, await r.json())
            async with s.get(server.url + "/health") as r:
                alive = r.status
            return declared, streamed, alive

    (status, body, _), streamed, alive = run(main())
    assert status == 413 and "--max-body-bytes" in body["error"]["message"]
    assert streamed[0] == 413
    assert alive == 200


def test_cli_errors_are_one_line_exit_2(tmp_path, model_dir):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-m", "armorm.cli", "serve", "--model", str(tmp_path / "missing"),
                        "--port", "0"], capture_output=True, text=True, env=env, timeout=HANG)
    assert r.returncode == 2 and r.stderr.startswith("armorm: error:"), r.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "armorm.cli", "serve", "--model", str(model_dir),
                            "--port", str(port)], capture_output=True, text=True, env=env, timeout=HANG)
    assert r.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "armorm.cli", "serve", "--max-wait-ms", "nan"],
                       capture_output=True, text=True, env=env, timeout=HANG)
    assert r.returncode == 2 and "--max-wait-ms" in r.stderr


def test_prepack_option_same_scores(server, model_dir, ref, tmp_path):
    """--prepack auto (the default) holds the fp32 weights packed on a SIMD kernel path and says so at start;
    off keeps them mapped; on prepacks (an error on the portable path); every setting gives the offline scores."""
    rng = np.random.default_rng(11)
    msgs = conversation(rng, 20, 40)
    expected = float(offline(ref, [chat_ids(ref, msgs)]).score[0])
    simd = ref._core.kernel != "portable"
    assert ("GB prepacked" in server.log_path.read_text()) == simd
    for setting in ("off", "on"):
        if setting == "on" and not simd:
            continue
        srv = CLIServer(model_dir, tmp_path / f"serve-{setting}.log", "--prepack", setting)
        try:
            async def main():
                async with aiohttp.ClientSession() as s:
                    return await post(s, srv.url + "/v1/score", {"messages": msgs})
            status, body, _ = run(main())
        finally:
            srv.stop()
        assert status == 200 and body["data"][0]["score"] == expected
        assert ("GB prepacked" in srv.log_path.read_text()) == (setting == "on"), srv.log_path.read_text()


def test_sigterm_finishes_requests_in_flight(model_dir, ref, hf_tok, tmp_path):
    """Requests queued at SIGTERM are all answered, with the offline scores, and the server exits 0.

    The server is started so that it never batches on its own (it waits for company that cannot come:
    a huge --max-wait-ms and a batch larger than all requests together), so every request is still
    in flight when the signal arrives; the signal makes the scheduler run them at once.
    """
    srv = CLIServer(model_dir, tmp_path / "serve.log", "--max-wait-ms", "1e9", "--max-batch-tokens", "1000000")
    rng = np.random.default_rng(7)
    convs = [conversation(rng, 20, int(rng.integers(10, 300))) for _ in range(16)]
    expected = offline(ref, [chat_ids(ref, c) for c in convs])
    try:
        async def main():
            async with aiohttp.ClientSession() as s:
                tasks = [asyncio.ensure_future(post(s, srv.url + "/get_reward", {"query": [openrlhf_query(hf_tok, c)]}))
                         for c in convs]
                while True:  # every request queued, none computed
                    m = await metrics(s, srv.url)
                    if m["armorm_queue_sequences"] == len(convs):
                        break
                    await asyncio.sleep(0.02)
                assert m.get("armorm_engine_tokens_total", 0) == 0
                srv.proc.send_signal(signal.SIGTERM)
                return await asyncio.gather(*tasks)

        outs = run(main())
        assert srv.proc.wait(HANG) == 0, srv.log_path.read_text()
    finally:
        srv.stop()
    assert [o[0] for o in outs] == [200] * len(convs)
    assert [o[1]["scores"][0] for o in outs] == [float(x) for x in expected.score]


# ---- scheduling, in-process with a gated engine ------------------------------------------


class GatedModel:
    """The real model, whose scoring records each batch and first waits for `gate`."""

    def __init__(self, model, fail_on: Optional[List[int]] = None) -> None:
        self._m = model
        self.gate = threading.Event()
        self.batches: List[List[List[int]]] = []
        self.fail_on = fail_on

    def __getattr__(self, name: str) -> Any:
        return getattr(self._m, name)

    def score_sequences(self, seqs, **kw):
        self.batches.append([s.tolist() for s in seqs])
        assert self.gate.wait(HANG), "the test never opened the gate"
        if self.fail_on is not None and any(s.tolist() == self.fail_on for s in seqs):
            raise RuntimeError("injected failure")
        return self._m.score_sequences(seqs, **kw)


@contextlib.contextmanager
def inprocess(model, **options):
    from armorm.serve import create_app
    from armorm.serve.server import bind, uvicorn_server
    app = create_app(model, **options)
    srv = app.state.armorm
    server = uvicorn_server(app, log_level="warning")
    sock = bind("127.0.0.1", 0)
    sock.listen(128)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + HANG
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "in-process server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", srv, server
    finally:
        if isinstance(model, GatedModel):
            model.gate.set()
        server.should_exit = True
        thread.join(HANG)
        sock.close()


async def until(cond, what: str) -> None:
    deadline = time.monotonic() + HANG
    while not cond():
        assert time.monotonic() < deadline, f"never happened: {what}"
        await asyncio.sleep(0.005)


async def hold_engine(s, url: str, gated: "GatedModel", seq, **fields):
    """Posts `seq` and waits until its batch entered the (gated) engine: later requests queue behind it."""
    t = asyncio.ensure_future(post(s, url + "/classify", {"input": seq, **fields}))
    await until(lambda: len(gated.batches) == 1, "the first batch started")
    return t


async def enqueue(s, url: str, srv, seq, queued: int, **fields):
    """Posts `seq` and waits until the queue holds `queued` sequences."""
    t = asyncio.ensure_future(post(s, url + "/classify", {"input": seq, **fields}))
    await until(lambda: srv.scheduler.queued_sequences == queued, f"{queued} sequences queued")
    return t


def _ids(ref, rng, n_prompt, n_response):
    return chat_ids(ref, conversation(rng, n_prompt, n_response))


def test_requests_arriving_during_a_batch_form_the_next_batch(ref):
    rng = np.random.default_rng(8)
    a, b, c, d = (_ids(ref, rng, 5, k) for k in (30, 10, 20, 40))
    expected = offline(ref, [a, b, c, d])
    gated = GatedModel(ref)
    with inprocess(gated, max_wait_ms=0) as (url, srv, _):
        async def main():
            async with aiohttp.ClientSession() as s:
                ta = await hold_engine(s, url, gated, a, use_activation=False)
                rest = [await enqueue(s, url, srv, seq, k + 1, use_activation=False) for k, seq in enumerate((b, c, d))]
                gated.gate.set()
                return await asyncio.gather(ta, *rest)

        outs = run(main())
    assert gated.batches == [[a], [b, c, d]]
    assert [o[1]["data"][0]["probs"][0] for o in outs] == [float(x) for x in expected.score]


def test_lone_request_waits_for_company_until_the_batch_is_full(ref):
    rng = np.random.default_rng(9)
    b, c = _ids(ref, rng, 5, 10), _ids(ref, rng, 5, 12)
    gated = GatedModel(ref)
    gated.gate.set()
    with inprocess(gated, max_wait_ms=1e9, max_batch_tokens=len(b) + len(c)) as (url, srv, _):
        async def main():
            async with aiohttp.ClientSession() as s:
                tb = await enqueue(s, url, srv, b, 1)
                assert gated.batches == []       # B alone does not start a batch: it waits for company
                tc = asyncio.ensure_future(post(s, url + "/classify", {"input": c}))
                return await asyncio.gather(tb, tc)

        outs = run(main())
    assert [o[0] for o in outs] == [200, 200]
    assert gated.batches == [[b, c]]


def test_fifo_long_requests_are_not_starved(ref):
    rng = np.random.default_rng(10)
    a = _ids(ref, rng, 5, 10)
    shorts = [_ids(ref, rng, 3, k) for k in (5, 6, 7, 8, 9)]
    long_ = _ids(ref, rng, 5, 150)
    budget = len(long_) + 5
    order = [shorts[0], long_, shorts[1], shorts[2], shorts[3], shorts[4]]
    gated = GatedModel(ref)
    with inprocess(gated, max_wait_ms=0, max_batch_tokens=budget) as (url, srv, _):
        async def main():
            async with aiohttp.ClientSession() as s:
                ta = await hold_engine(s, url, gated, a)
                tasks = [await enqueue(s, url, srv, seq, k + 1) for k, seq in enumerate(order)]
                gated.gate.set()
                return await asyncio.gather(ta, *tasks)

        outs = run(main())
    assert all(o[0] == 200 for o in outs)
    flat = [seq for batch in gated.batches for seq in batch]
    assert flat == [a] + order                      # served in arrival order
    assert [long_] in gated.batches                 # the long one ran (alone: nothing else fits beside it)
    assert all(sum(len(x) for x in batch) <= budget for batch in gated.batches)


def test_client_gone_before_its_batch_costs_nothing(ref):
    rng = np.random.default_rng(11)
    a, b, c = (_ids(ref, rng, 5, k) for k in (10, 11, 12))
    gated = GatedModel(ref)
    with inprocess(gated, max_wait_ms=0) as (url, srv, _):
        async def main():
            async with aiohttp.ClientSession() as s:
                ta = await hold_engine(s, url, gated, a)
                tb = await enqueue(s, url, srv, b, 1)
                tb.cancel()                              # the client closes its connection
                with contextlib.suppress(asyncio.CancelledError):
                    await tb
                await until(lambda: srv.scheduler.queued_sequences == 0, "B dropped from the queue")
                tc = await enqueue(s, url, srv, c, 1)
                gated.gate.set()
                return await asyncio.gather(ta, tc), await metrics(s, url)

        (oa, oc), m = run(main())
    assert oa[0] == 200 and oc[0] == 200
    assert gated.batches == [[a], [c]]                   # B was never computed
    assert m["armorm_skipped_sequences_total"] == 1
    assert m['armorm_errors_total{kind="client_disconnected"}'] == 1


def test_exception_in_a_batch_fails_only_that_batch(ref):
    rng = np.random.default_rng(12)
    a, bad, c = _ids(ref, rng, 5, 10), _ids(ref, rng, 5, 40), _ids(ref, rng, 5, 30)
    expected = offline(ref, [a, c])
    gated = GatedModel(ref, fail_on=bad)
    # the budget fits one of bad / c, not both: they land in different batches
    with inprocess(gated, max_wait_ms=0, max_batch_tokens=max(len(bad), len(c)) + 1) as (url, srv, _):
        async def main():
            async with aiohttp.ClientSession() as s:
                ta = await hold_engine(s, url, gated, a)
                tb = await enqueue(s, url, srv, bad, 1, use_activation=False)
                tc = await enqueue(s, url, srv, c, 2, use_activation=False)
                gated.gate.set()
                outs = await asyncio.gather(ta, tb, tc)
                after = await post(s, url + "/classify", {"input": a, "use_activation": False})
                return outs, after

        (oa, ob, oc), after = run(main())
    assert ob[0] == 500 and "injected failure" in ob[1]["error"]["message"]
    assert oc[0] == 200 and oc[1]["data"][0]["probs"] == [float(expected.score[1])]
    assert after[0] == 200 and after[1]["data"][0]["probs"] == [float(expected.score[0])]
    assert gated.batches == [[a], [bad], [c], [a]]


def test_full_queue_answers_503_with_retry_after(ref):
    rng = np.random.default_rng(13)
    a, b, c = (_ids(ref, rng, 5, k) for k in (10, 20, 20))
    gated = GatedModel(ref)
    with inprocess(gated, max_wait_ms=0, max_queue_tokens=len(b) + len(c) - 1) as (url, srv, _):
        async def main():
            async with aiohttp.ClientSession() as s:
                ta = await hold_engine(s, url, gated, a)
                tb = await enqueue(s, url, srv, b, 1)
                full = await post(s, url + "/classify", {"input": c})
                huge = await post(s, url + "/classify", {"input": [b, c]})
                gated.gate.set()
                outs = await asyncio.gather(ta, tb)
                again = await post(s, url + "/classify", {"input": c})   # the queue drained: accepted
                return full, huge, outs, again

        full, huge, outs, again = run(main())
    status, body, headers = full
    assert status == 503 and int(headers["Retry-After"]) >= 1 and "queue is full" in body["error"]["message"]
    assert huge[0] == 413 and "--max-queue-tokens" in huge[1]["error"]["message"]
    assert [o[0] for o in outs] == [200, 200] and again[0] == 200


def test_shutdown_stops_accepting_and_finishes_in_flight(ref):
    rng = np.random.default_rng(14)
    a = _ids(ref, rng, 5, 10)
    expected = offline(ref, [a])
    gated = GatedModel(ref)
    with inprocess(gated, max_wait_ms=0) as (url, srv, server):
        port = int(url.rsplit(":", 1)[1])

        async def main():
            async with aiohttp.ClientSession() as s:
                ta = await hold_engine(s, url, gated, a, use_activation=False)
                server.handle_exit(signal.SIGTERM, None)     # what the SIGTERM handler does

                def refused() -> bool:
                    with socket.socket() as probe:
                        return probe.connect_ex(("127.0.0.1", port)) != 0
                await until(refused, "the listener closed")
                assert not ta.done()
                gated.gate.set()
                return await ta

        status, body, _ = run(main())
    assert status == 200 and body["data"][0]["probs"] == [float(expected.score[0])]


def test_create_app_refuses_a_model_without_reward_head(tmp_path):
    from armorm.serve import create_app
    from checkpoints import make_backbone
    make_backbone(tmp_path / "bb", hidden=32, heads=4, kv_heads=2, inter=64, layers=1, vocab=300)
    with armorm.ArmoRM.from_pretrained(tmp_path / "bb") as m:
        with pytest.raises(ValueError, match="no reward head"):
            create_app(m)


def test_verl_custom_reward_function(server, ref, monkeypatch):
    import importlib.util
    loader = importlib.util.spec_from_file_location("verl_reward", ROOT / "examples" / "verl_reward.py")
    mod = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(mod)
    monkeypatch.setenv("ARMORM_SERVE_URL", server.url)
    monkeypatch.setenv("ARMORM_API_KEY", API_KEY)
    rng = np.random.default_rng(15)
    conv = conversation(rng, 12, 30)
    expected = float(offline(ref, [chat_ids(ref, conv)]).score[0])
    got = mod.compute_score("ds", conv[1]["content"], None, {"raw_prompt": conv[:1]})
    assert got == expected
    assert mod.compute_score("ds", conv[1]["content"], None, {"question": conv[0]["content"]}) == expected
    with pytest.raises(RuntimeError, match="404"):
        monkeypatch.setenv("ARMORM_SERVE_URL", server.url + "/nowhere")
        mod.compute_score("ds", "x", None, {"question": "q"})


@pytest.mark.parametrize("family", ["qwen3", "gemma2"])
def test_other_families_sequence_classifiers_are_served(tmp_path, family):
    """A *ForSequenceClassification of another family is a reward model too: served, scores as offline."""
    from checkpoints import make_seqcls
    make_seqcls(tmp_path / family, family=family, hidden=32, heads=4, kv_heads=2, inter=64, layers=2, vocab=300)
    rng = np.random.default_rng(21)
    seqs = [rng.integers(1, 300, size=n).tolist() for n in (7, 30, 19)]
    with armorm.ArmoRM.from_pretrained(tmp_path / family) as model:
        expected = offline(model, seqs)
        with inprocess(model, max_wait_ms=0) as (url, _, _):
            async def main():
                async with aiohttp.ClientSession() as s:
                    return await post(s, url + "/classify", {"input": seqs, "use_activation": False})

            status, body, _ = run(main())
    assert status == 200, body
    assert [d["probs"][-1] for d in body["data"]] == [float(x) for x in expected.score]


def test_model_loads_on_a_thread_that_ends():
    """run() loads on a short-lived thread (its OpenMP pool goes with it, docs/serving.md 'Threads'):
    the value and any exception come back to the caller; the thread is gone afterwards."""
    from armorm.serve.server import _in_own_thread
    seen = []

    def load():
        seen.append(threading.current_thread())
        return 42

    assert _in_own_thread(load) == 42
    assert seen[0] is not threading.current_thread() and not seen[0].is_alive()
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        _in_own_thread(lambda: (_ for _ in ()).throw(FileNotFoundError("no such checkpoint")))
