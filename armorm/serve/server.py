"""`run`: load a model, bind, and serve with uvicorn until SIGTERM or Ctrl-C.

The socket is bound before the model loads (a port in use fails at once,
before minutes of loading) and starts listening once the model is ready.
SIGTERM stops accepting connections, lets every request in flight finish,
then returns normally (exit status 0 from the CLI).
"""
from __future__ import annotations

import os
import signal
import socket
import sys
import threading
from typing import Any, Callable, List, Optional, Union

import uvicorn

from ..model import ArmoRM
from .app import create_app


def bind(host: str, port: int) -> socket.socket:
    """A bound TCP socket (not yet listening); OSError names the address."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise OSError(f"cannot resolve --host {host!r}: {e.strerror}") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _exit_quietly(signum: int, frame: Any) -> None:
    raise SystemExit(0)


class _Uvicorn(uvicorn.Server):
    """uvicorn's server; a shutdown signal also tells the scheduler to stop waiting for company."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig: int, frame: Any) -> None:
        self._on_exit()
        super().handle_exit(sig, frame)


def uvicorn_server(app: Any, *, log_level: str = "info", access_log: bool = False) -> uvicorn.Server:
    """A uvicorn server for an app from `create_app`; `server.run(sockets=[sock])` serves.

    `server.handle_exit(signal.SIGTERM, None)` (what SIGTERM calls) starts the graceful shutdown.
    """
    config = uvicorn.Config(app, log_level=log_level, access_log=access_log, lifespan="on", backlog=2048,
                            timeout_keep_alive=30)
    return _Uvicorn(config, app.state.armorm.scheduler.flush)


def _in_own_thread(fn: Callable[[], Any]) -> Any:
    """fn() on a thread that ends when it returns, which takes its OpenMP thread pool with it.

    OpenMP (libgomp) keeps one pool of worker threads per thread that ever
    started a parallel region. Loading runs parallel passes over the weights;
    done on the main thread, it would leave a second pool beside the
    scheduler thread's, and with more OpenMP threads than CPUs libgomp stops
    spinning at barriers and sleeps instead: the engine ran 5-15% slower in
    the serve benchmark (docs/serving.md, 'Threads').
    """
    result: List[Any] = []
    error: List[BaseException] = []

    def target() -> None:
        try:
            result.append(fn())
        except BaseException as e:  # re-raised on the caller's thread
            error.append(e)

    t = threading.Thread(target=target, name="armorm-load", daemon=True)
    t.start()
    t.join()
    if error:
        raise error[0]
    return result[0]


def run(model: Union[ArmoRM, str, "os.PathLike[str]"], *, host: str = "127.0.0.1", port: int = 8000,
        device: str = "cpu", dtype: str = "bfloat16", threads: Optional[int] = None,
        prepack: Optional[bool] = None, served_model_name: Any = None, log_level: str = "info",
        access_log: bool = False, announce: Optional[Callable[[str], None]] = None, **app_options: Any) -> None:
    """Serves `model` (a loaded ArmoRM, or a directory / hub id to load) until SIGTERM or Ctrl-C.

    `device`, `dtype`, `threads` and `prepack` (from_pretrained's: None
    prepacks where that takes no more memory) are used when loading.
    `port=0` picks a free port. `announce(line)` is called once the server accepts
    connections (default: the line goes to stderr:
    "armorm serve: ... listening on http://HOST:PORT"). Other keyword
    arguments go to `create_app` (max_batch_tokens, max_wait_ms,
    max_queue_tokens, max_length, api_key, max_body_bytes).
    """
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _exit_quietly) if main else None
    try:
        sock = bind(host, port)
        try:
            if not isinstance(model, ArmoRM):
                if served_model_name is None:
                    served_model_name = str(model)
                path = model
                model = _in_own_thread(lambda: ArmoRM.from_pretrained(path, device_map=device, torch_dtype=dtype,
                                                                      num_threads=threads, prepack=prepack))
            app = create_app(model, served_model_name=served_model_name, **app_options)
            server = uvicorn_server(app, log_level=log_level, access_log=access_log)
            sock.listen(2048)
            packed = f", {model.prepacked_bytes / 1e9:.2f} GB prepacked" if model.prepacked_bytes else ""
            line = (f"armorm serve: {model.name_or_path} ({model.architecture}, {model.dtype}, {model.device}{packed}) "
                    f"listening on {_url(sock)}")
            if announce is None:
                print(line, file=sys.stderr, flush=True)
            else:
                announce(line)
            # uvicorn re-raises the SIGTERM it handled once the graceful shutdown is done: with our
            # handler restored by then, that ends the process with status 0
            server.run(sockets=[sock])
        finally:
            sock.close()
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
