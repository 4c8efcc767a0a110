"""Reward-server load test: `armorm serve` vs offline scoring vs an OpenRLHF-style transformers server.

    flock /tmp/armorm-bench.lock python benchmarks/serve_load.py [--shape small] [--dtype bf16]
        [--clients 1,8,32,64] [--items-per-client 2] [--min-items 16] [--threads 2] [--rounds 1]

One run, one table. A random ArmoRM-shaped checkpoint of --shape
(benchmarks/make_checkpoint.py; `small` = hidden 512, 4 layers, 8/2 heads,
intermediate 1536, Llama-3 vocabulary) with the real Llama-3 tokenizer scores
conversations of 100-2000 tokens (prompt + response, uniform). For each
number of concurrent clients C, the first max(--min-items, C x
--items-per-client) conversations are scored three ways:

- (a) `armorm serve` (the CLI, --threads threads), each client posting one
  sample per request to /get_reward with a fresh aiohttp session, as
  OpenRLHF's `_fetch_rewards_via_http` does, and posting the next when the
  answer arrives;
- (b) the same token sequences scored offline with `score_sequences` (packed
  batches of 8192 tokens) in a process of its own, as the servers run: the
  ceiling. Measured twice: as is, and with OMP_WAIT_POLICY=passive (OpenMP
  workers that sleep instead of spinning between parallel regions: on a
  machine whose cores are oversubscribed, spinning workers of a call made
  from the main thread were measured to cost up to 1.7x the CPU time per
  token); the better of the two is the ceiling;
- (c) a server built the way OpenRLHF's `openrlhf/cli/serve_rm.py` is: an
  ASGI app whose async handler tokenizes the request's queries (padding=True)
  and runs the transformers model on them right there, so requests run one
  at a time in arrival order; the model is transformers' LlamaModel on the
  same checkpoint in --dtype (serve_rm's default is bf16) plus the ArmoRM
  head in fp32; --threads torch threads.

Throughput is scored tokens / wall time from the first request to the last
answer; latency is per request (p99 of a few dozen requests is close to the
maximum). With --rounds R each row measures (b), (a), (c) in turn R times and
shows the median throughputs (on a shared machine the load drifts). The
servers and (b) run in their own processes; the clients run in this one (the
machine's cores are shared by all). armorm serve's scores are checked to
equal (b) bit for bit, and (c)'s to be close to them.

Goals (on a CPU): at 32 clients, (a) >= 90% of (b) and >= 3x (c).

Internal modes (the other processes): serve_load.py --transformers-server DIR --dtype D --threads N,
serve_load.py --offline DIR --ids FILE --n N --dtype D --threads N
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))
from machine import describe  # noqa: E402

WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at which but have an "
         "they you were her she there can all their one been has more if will would we so no some what when up "
         "out about into than them could only other new time these two may then do first any like now my such "
         "answer question reward model code list value number people water world work year day way").split()
TOOL_DTYPES = {"bf16": "bfloat16", "fp32": "float32"}


# ---- data -----------------------------------------------------------------------------


def conversations(tok: Any, n: int, seed: int = 0) -> Tuple[List[str], List[List[int]]]:
    """n conversations of 100-2000 tokens: (OpenRLHF query texts, their token ids)."""
    from armorm.tokenizer import format_conversations
    rng = np.random.default_rng(seed)
    texts, ids = [], []
    while len(texts) < n:
        total = int(rng.integers(100, 2001))
        n_prompt = max(1, int(total * rng.uniform(0.1, 0.6)))
        words = rng.choice(WORDS, size=total)
        msgs = [{"role": "user", "content": " ".join(words[:n_prompt])},
                {"role": "assistant", "content": " ".join(words[n_prompt:])}]
        seq = format_conversations(tok, [msgs])[0]
        excess = len(seq) - total
        if excess > 0:  # the template's tokens: shorten the response to hit the drawn length
            msgs[1]["content"] = " ".join(words[n_prompt:len(words) - excess])
            seq = format_conversations(tok, [msgs])[0]
        if not 100 <= len(seq) <= 2000:
            continue
        texts.append(tok.apply_chat_template(msgs, tokenize=False))  # BOS, headers, <|eot_id|> as text
        ids.append(seq)
    return texts, ids


def checkpoint(cache: Path, shape: str, dtype: str) -> Path:
    from llama3_tokenizer import llama3_tokenizer_dir
    from make_checkpoint import make_checkpoint
    d = cache / f"{shape}-{dtype}"
    if not (d / "config.json").exists():
        make_checkpoint(d, shape=shape, dtype=dtype, arch="armorm", quiet=True)
    tok_dir = Path(llama3_tokenizer_dir(cache))
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tok_dir / f).exists() and not (d / f).exists():
            shutil.copy(tok_dir / f, d / f)
    return d


# ---- servers ----------------------------------------------------------------------------


class Server:
    """A server subprocess that prints 'listening on http://HOST:PORT' when ready."""

    def __init__(self, cmd: List[str], log: Path) -> None:
        self.log_path = log
        self._log = open(log, "wb")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
        while True:
            m = re.search(r"listening on (http://\S+)", log.read_text(errors="replace"))
            if m:
                self.url = m.group(1)
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"{cmd[:4]} did not start:\n{log.read_text()}")
            time.sleep(0.1)

    def stop(self) -> None:
        import signal
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(120)
        self._log.close()


def transformers_server(model_dir: str, dtype: str, threads: int) -> None:
    """The competitor: serve_rm.py's design (an async handler running the model inline) on transformers."""
    import torch
    import uvicorn
    from safetensors.torch import load_file
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from transformers import AutoTokenizer, LlamaModel

    from armorm.serve.server import bind
    from armorm.tokenizer import find_gating_position
    from checkpoints import reference_armorm_head

    torch.set_num_threads(threads)
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    backbone = LlamaModel.from_pretrained(model_dir, dtype=getattr(torch, TOOL_DTYPES[dtype])).eval()
    head = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        head.update({k: v.float() for k, v in load_file(str(f)).items() if not k.startswith("model.")})
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    pattern = [128009, 128006, 78191, 128007, 271]

    def get_reward_sync(queries: List[str]) -> List[float]:
        batch = tok(queries, return_tensors="pt", add_special_tokens=False, max_length=8192, padding=True,
                    truncation=True)
        with torch.no_grad():
            hs = backbone(**batch).last_hidden_state.float()
            scores = []
            for row, ids, mask in zip(hs, batch["input_ids"], batch["attention_mask"]):
                start = int((mask == 0).sum())  # left padding
                p_g = find_gating_position(ids[start:].numpy(), pattern) + start
                out = reference_armorm_head(row, row.shape[0] - 1, p_g, head, cfg["gating_temperature"],
                                            cfg["gating_n_hidden"])
                scores.append(float(out["score"]))
        return scores

    async def get_reward(request: Request) -> JSONResponse:
        data = await request.json()
        rewards = get_reward_sync(data.get("query"))   # inline, as serve_rm does: one request at a time
        return JSONResponse({"rewards": rewards, "scores": rewards, "extra_logs": {"dummy_scores": rewards}})

    app = Starlette(routes=[Route("/get_reward", get_reward, methods=["POST"])])
    sock = bind("127.0.0.1", 0)
    sock.listen(2048)
    print(f"transformers server listening on http://127.0.0.1:{sock.getsockname()[1]}", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])


def offline(model_dir: str, ids_file: str, n: int, dtype: str, threads: int) -> None:
    """(b): one warm-up call, then the first n sequences in packed batches; prints tokens/s and the scores."""
    import armorm
    ids = json.loads(Path(ids_file).read_text())[:n]
    model = armorm.ArmoRM.from_pretrained(model_dir, torch_dtype=TOOL_DTYPES[dtype], num_threads=threads)
    seqs = [np.asarray(s, dtype=np.int32) for s in ids]
    model.score_sequences(seqs[:2])
    t0 = time.perf_counter()
    out = model.score_sequences(seqs, batch_tokens=8192)
    tok_s = sum(s.size for s in seqs) / (time.perf_counter() - t0)
    print(json.dumps({"tok_s": tok_s, "scores": [float(x) for x in out.score]}))


# ---- load ------------------------------------------------------------------------------


async def load(url: str, texts: List[str], lengths: List[int], clients: int) -> Dict[str, Any]:
    """`clients` closed-loop clients send one sample per request until every text is scored."""
    import aiohttp
    nxt = 0
    scores: List[float] = [0.0] * len(texts)
    lat: List[float] = []

    async def client() -> None:
        nonlocal nxt
        while nxt < len(texts):
            i = nxt
            nxt += 1
            t0 = time.perf_counter()
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as session:
                async with session.post(url + "/get_reward", json={"query": [texts[i]], "prompts": [""],
                                                                   "labels": [None]}) as r:
                    r.raise_for_status()
                    scores[i] = (await r.json())["scores"][0]
            lat.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*[client() for _ in range(clients)])
    wall = time.perf_counter() - t0
    return {"tok_s": sum(lengths) / wall, "lat": lat, "scores": scores}


def _median_run(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Median throughput over rounds; latency percentiles of all their requests together."""
    lat = [x for r in runs for x in r["lat"]]
    return {"tok_s": statistics.median(r["tok_s"] for r in runs), "p50": _pct(lat, 50), "p99": _pct(lat, 99)}


def _pct(xs: List[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q, method="nearest"))


def warm(url: str, texts: List[str]) -> None:
    asyncio.run(load(url, texts[:2], [1, 1], 1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="small", help="benchmarks/make_checkpoint.py shape (default: small)")
    ap.add_argument("--dtype", choices=sorted(TOOL_DTYPES), default="bf16",
                    help="checkpoint and model dtype for every competitor (default: bf16, serve_rm's default)")
    ap.add_argument("--clients", default="1,8,32,64", help="concurrent clients per row (default: 1,8,32,64)")
    ap.add_argument("--items-per-client", type=int, default=2, help="conversations per client (default: 2)")
    ap.add_argument("--min-items", type=int, default=16, help="fewest conversations in a row (default: 16)")
    ap.add_argument("--threads", type=int, default=2, help="model threads of every competitor (default: 2)")
    ap.add_argument("--rounds", type=int, default=1, help="measurements per row, interleaved (default: 1)")
    ap.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "armorm-bench" / "serve")
    ap.add_argument("--transformers-server", metavar="DIR", help=argparse.SUPPRESS)
    ap.add_argument("--offline", metavar="DIR", help=argparse.SUPPRESS)
    ap.add_argument("--ids", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.transformers_server:
        transformers_server(args.transformers_server, args.dtype, args.threads)
        return 0
    if args.offline:
        offline(args.offline, args.ids, args.n, args.dtype, args.threads)
        return 0

    import armorm
    clients = [int(c) for c in args.clients.split(",")]
    d = checkpoint(args.cache_dir, args.shape, args.dtype)
    n_max = max(max(args.min_items, c * args.items_per_client) for c in clients)
    texts, ids = conversations(armorm.ChatTokenizer.from_pretrained(d), n_max)
    lengths = [len(s) for s in ids]
    ids_file = args.cache_dir / "ids.json"
    ids_file.write_text(json.dumps(ids))
    print(f"checkpoint {d} ({args.shape}, {args.dtype}); {n_max} conversations of {min(lengths)}-{max(lengths)} "
          f"tokens (mean {statistics.mean(lengths):.0f}); {args.threads} threads each", flush=True)

    logs = args.cache_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    a = Server([sys.executable, "-m", "armorm.cli", "serve", "--model", str(d), "--port", "0", "--dtype",
                TOOL_DTYPES[args.dtype], "--threads", str(args.threads), "--max-queue-tokens", "10000000"],
               logs / "armorm.log")
    c = Server([sys.executable, str(Path(__file__).resolve()), "--transformers-server", str(d), "--dtype", args.dtype,
                "--threads", str(args.threads)], logs / "transformers.log")
    rows = []
    try:
        warm(a.url, texts)
        warm(c.url, texts)
        for n_clients in clients:
            n = max(args.min_items, n_clients * args.items_per_client)
            offs, passive, ras, rcs = [], [], [], []
            for _ in range(args.rounds):
                cmd = [sys.executable, str(Path(__file__).resolve()), "--offline", str(d), "--ids", str(ids_file),
                       "--n", str(n), "--dtype", args.dtype, "--threads", str(args.threads)]
                offs.append(json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True,
                                                      cwd=str(ROOT)).stdout))
                passive.append(json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True,
                                                         cwd=str(ROOT), env=dict(os.environ, OMP_WAIT_POLICY="passive")
                                                         ).stdout))
                ras.append(asyncio.run(load(a.url, texts[:n], lengths[:n], n_clients)))
                rcs.append(asyncio.run(load(c.url, texts[:n], lengths[:n], n_clients)))
            ref = offs[0]["scores"]
            off = statistics.median(o["tok_s"] for o in offs)
            off_p = statistics.median(o["tok_s"] for o in passive)
            ra, rc = _median_run(ras), _median_run(rcs)
            exact = all(r["scores"] == ref for r in ras + offs + passive)
            diff = max(float(np.max(np.abs(np.asarray(r["scores"]) - np.asarray(ref)))) for r in rcs)
            rows.append((n_clients, n, sum(lengths[:n]), off, off_p, ra, rc, exact, diff))
            print(f"  {n_clients} clients: offline {off:.0f} / {off_p:.0f} tok/s, armorm serve {ra['tok_s']:.0f}, "
                  f"transformers {rc['tok_s']:.0f} (load {os.getloadavg()[0]:.1f})", flush=True)
    finally:
        a.stop()
        c.stop()

    print(f"\n{describe()} (at the end)")
    print("| clients | requests (tokens) | offline tok/s | offline, passive OpenMP wait | armorm serve tok/s "
          "| % of the better offline | p50 s | p99 s "
          "| transformers server tok/s | p50 s | p99 s | armorm / transformers | scores = offline | "
          "max abs diff (transformers) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |")
    for n_clients, n, tokens, off, off_p, ra, rc, exact, diff in rows:
        print(f"| {n_clients} | {n} ({tokens}) | {off:.0f} | {off_p:.0f} | {ra['tok_s']:.0f} "
              f"| {100 * ra['tok_s'] / max(off, off_p):.0f}% "
              f"| {ra['p50']:.2f} | {ra['p99']:.2f} | {rc['tok_s']:.0f} | {rc['p50']:.2f} | {rc['p99']:.2f} "
              f"| {ra['tok_s'] / rc['tok_s']:.2f}x | {'yes' if exact else 'NO'} | {diff:.1e} |")
    return 0 if all(r[7] for r in rows) else 1



if __name__ == "__main__":
    sys.exit(main())
