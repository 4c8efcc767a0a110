"""A verl custom reward function that asks an `armorm serve` server for the reward.

    export ARMORM_SERVE_URL=http://HOST:8000      # ARMORM_API_KEY too when the server has a key
    python -m verl.trainer.main_ppo ... reward_model.enable=False \
        custom_reward_function.path=examples/verl_reward.py custom_reward_function.name=compute_score

verl calls `compute_score` once per sample (from worker threads, so requests
from many samples reach the server together and are batched there). The
conversation is the dataset's prompt plus the decoded response: the prompt is
`extra_info["raw_prompt"]` (a message list) when present, else
`extra_info["question"]` or `extra_info["prompt"]` (the user's text). It is
posted as `messages` to vLLM's `/classify` route, which renders it with the
reward model's own chat template; the reward is `data[-1].probs[-1]` with
`use_activation: false`, as verl reads it from vLLM. Only the standard library
is used.
"""
from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from typing import Any, Dict, List, Optional

TRIES = 16            # as verl's own reward-model client
MAX_BACKOFF_S = 30.0


def _messages(solution_str: str, extra_info: Optional[Dict[str, Any]]) -> List[Dict[str, str]]:
    info = extra_info or {}
    prompt = info.get("raw_prompt")
    if isinstance(prompt, (list, tuple)) and prompt:
        msgs = [{"role": str(m["role"]), "content": str(m["content"])} for m in prompt]
    else:
        text = info.get("question", info.get("prompt"))
        if not isinstance(text, str):
            raise ValueError("extra_info needs 'raw_prompt' (messages) or 'question' / 'prompt' (text) to score "
                             "the response in its conversation")
        msgs = [{"role": "user", "content": text}]
    return msgs + [{"role": "assistant", "content": solution_str}]


def compute_score(data_source: Any = None, solution_str: str = "", ground_truth: Any = None,
                  extra_info: Optional[Dict[str, Any]] = None, **kwargs: Any) -> float:
    """The reward of `solution_str` as the answer to the sample's prompt."""
    url = os.environ.get("ARMORM_SERVE_URL", "http://127.0.0.1:8000").rstrip("/") + "/classify"
    body = json.dumps({"messages": _messages(solution_str, extra_info), "use_activation": False}).encode()
    headers = {"Content-Type": "application/json"}
    key = os.environ.get("ARMORM_API_KEY")
    if key:
        headers["Authorization"] = f"Bearer {key}"
    for attempt in range(TRIES):
        wait = min(2.0 ** attempt, MAX_BACKOFF_S)
        try:
            with urllib.request.urlopen(urllib.request.Request(url, body, headers), timeout=3600) as r:
                return float(json.loads(r.read())["data"][-1]["probs"][-1])
        except urllib.error.HTTPError as e:
            if e.code < 500:  # the request itself is wrong: retrying cannot help
                raise RuntimeError(f"{url}: {e.code} {e.read().decode(errors='replace')}") from None
            if e.headers.get("Retry-After", "").isdigit():
                wait = float(e.headers["Retry-After"])
            if attempt == TRIES - 1:
                raise
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if attempt == TRIES - 1:
                raise
        time.sleep(wait)
    raise AssertionError("unreachable")
