"""`armorm serve`: the reward server that RLHF trainers call over HTTP.

    app = armorm.serve.create_app(model)          # an ASGI app for a loaded armorm.ArmoRM
    armorm.serve.run("path/to/model", port=8000)  # load, bind, serve until SIGTERM / Ctrl-C

Endpoints: OpenRLHF's `/get_reward`, vLLM's `/classify` and `/pooling`,
SGLang's `/v1/embeddings`, armorm's `/v1/score`, `/health`, `/v1/models` and
Prometheus `/metrics`. Requests from many clients are batched by one
scheduler thread that owns the model. docs/serving.md describes the protocol.

Needs the `serve` extra (`pip install "armorm[serve]"`: starlette, uvicorn,
prometheus_client); importing this package does not, only using it does.
"""
from __future__ import annotations

from typing import Any

__all__ = ["create_app", "run"]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'armorm.serve' has no attribute {name!r}")
    try:
        if name == "create_app":
            from .app import create_app as obj
        else:
            from .server import run as obj
    except ImportError as e:
        raise ImportError(f"armorm serve needs the 'serve' extra ({e.name or e} is missing): "
                          "pip install \"armorm[serve]\"") from e
    return obj
