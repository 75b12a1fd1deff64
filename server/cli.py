"""The ``sluice`` command: ``sluice serve`` runs the server, ``sluice schema`` writes the contract.

``serve`` reads `Settings` (the only reader of the environment); its flags override the matching
fields. It runs uvicorn programmatically, as a `server.shutdown.DrainingServer`, so SIGTERM
drains the sessions (``goaway``, running requests finish, close 1012) before uvicorn closes
anything. With ``--workers N`` the parent binds the socket once and starts N such servers in
spawned processes, forwarding SIGTERM/SIGINT to them. N > 1 needs cluster mode
(``SLUICE_REDIS_URL``), through which the workers share sessions; without it ``serve`` refuses
to start and says what to set, since a client reconnecting to another worker would lose its
session.

uvicorn is set up for the protocol: WebSocket frames past ``max_frame_bytes`` close 1009,
keepalive pings every ``ws_ping_interval_s``, and no permessage-deflate (a compressor per socket
costs more memory than an idle session may use, and CPU on every token). The event loop is uvloop
and HTTP/1.1 is parsed by httptools, named rather than left to uvicorn's "auto", so a missing
package fails the start instead of silently costing CPU on every request. WebSockets run on
uvicorn's websockets-sansio protocol with sluice's many-frames extension
(`server.transports.wsframes`), HTTP on uvicorn's httptools protocol with sluice's write-a-body-
chunk-now extension (`server.api.httpbody`).

Once the models have loaded, everything allocated so far is moved out of the garbage collector's
sight (``gc.freeze``): the imported libraries and loaded models never become garbage, yet every
full collection walked all of them, pausing the loop far longer than the relay's p99 target
allows. Only what is allocated after start-up is collected from then on, on thresholds that keep
full collections rare (`GC_THRESHOLDS`): the sessions' replay logs hold a few tracked objects per
streamed token for ``session_ttl_s``, and with Python's defaults a full collection walked them
every few seconds under load. Young and middle collections keep Python's thresholds: each walks
only recent objects, and the cyclic garbage of requests is still found soon. Measurements: ``bench/results/README.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import multiprocessing
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn

from server.api.httpbody import BodyProtocol
from server.settings import Settings
from server.shutdown import DrainingServer
from server.transports.wsframes import FramesProtocol

__all__ = ["ContextFormatter", "configure_logging", "listen_socket", "main", "serve", "uvicorn_config"]

# What uvicorn itself waits for connections after the app drained (stuck peers must not hang exit).
_GRACE_AFTER_DRAIN_S = 3
_STARTUP_FAILURE = 3
# Workers without a shared store would each keep their own sessions: a reconnect reaching another
# worker would silently lose its session, the protocol's central promise.
_WORKERS_NEED_REDIS = (
    "sluice: --workers {workers} (SLUICE_WORKERS) needs cluster mode, so that the workers share "
    "sessions: set SLUICE_REDIS_URL (for example redis://127.0.0.1:6379/0), or run one worker"
)
# How often start-up checks whether the models are still loading (to freeze the heap after).
_LOAD_POLL_S = 0.25
# gc.set_threshold after start-up: Python's own young and middle thresholds (short, frequent
# pauses), full collections after 1,000 middle ones instead of 10.
GC_THRESHOLDS = (700, 10, 1000)


# What code logging about a request passes as ``extra=``; appended to the line as key=value.
CONTEXT_FIELDS = ("session", "request", "model")


class ContextFormatter(logging.Formatter):
    """``time level logger: message key=value ...``: every line about a request can be found by
    its session or request id. Nothing may log a credential (keys never reach a log record)."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context = [
            f"{name}={value}" for name in CONTEXT_FIELDS if (value := getattr(record, name, None)) is not None
        ]
        return f"{line} {' '.join(context)}" if context else line


def configure_logging(level: str) -> None:
    """Every record at ``level`` or above to stderr, through `ContextFormatter`; uvicorn's loggers
    propagate here (it gets no ``log_config`` of its own)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(ContextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def uvicorn_config(app: Any, settings: Settings) -> uvicorn.Config:
    """The uvicorn `Config` for ``app`` under ``settings``."""
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http=BodyProtocol,
        ws=FramesProtocol,
        ws_max_size=settings.max_frame_bytes,
        ws_ping_interval=settings.ws_ping_interval_s,
        ws_ping_timeout=settings.ws_ping_timeout_s,
        ws_per_message_deflate=False,
        lifespan="on",
        log_config=None,
        log_level=settings.log_level,
        timeout_graceful_shutdown=_GRACE_AFTER_DRAIN_S,
    )


def serve(settings: Settings, sockets: list[socket.socket] | None = None) -> None:
    """Run one server process until it is told to stop (blocking)."""
    from server.app import create_app  # imports the backends: only when serving

    app = create_app(settings)
    config = uvicorn_config(app, settings)
    if sockets is None and settings.socket_send_buffer_bytes:
        sockets = [listen_socket(config, settings)]
    server = _Server(config, app.state.sluice.drainer.drain, app.state.sluice.registry.status)
    server.run(sockets=sockets)
    if not server.started:
        sys.exit(_STARTUP_FAILURE)


def freeze_heap() -> None:
    """Collect what is garbage now, exempt every surviving object from future collections, and
    set the thresholds the server runs on (`GC_THRESHOLDS`)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def loading(status: dict[str, object]) -> bool:
    """Whether a registry ``status()`` says some model is still loading."""
    local = status.get("local")
    states = (
        [entry.get("state") for entry in local.values() if isinstance(entry, dict)]
        if isinstance(local, dict)
        else []
    )
    ollama = status.get("ollama")
    if isinstance(ollama, dict):
        states.append(ollama.get("state"))
    return "loading" in states


async def freeze_after_loading(status: Callable[[], dict[str, object]]) -> None:
    """`freeze_heap` once uvicorn has started and again once no model is loading any more."""
    freeze_heap()
    # Polled: the registry's status is all a server exposes about loading (no event to wait on).
    while loading(status()):  # noqa: ASYNC110
        await asyncio.sleep(_LOAD_POLL_S)
    freeze_heap()


class _Server(DrainingServer):
    """The `DrainingServer` that freezes its start-up heap (see the module docstring)."""

    def __init__(
        self,
        config: uvicorn.Config,
        drain: Callable[[], Awaitable[None]],
        status: Callable[[], dict[str, object]],
    ) -> None:
        super().__init__(config, drain)
        self._status = status
        self._freezing: asyncio.Task[None] | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            self._freezing = asyncio.create_task(freeze_after_loading(self._status), name="sluice gc freeze")

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self._freezing is not None:
            self._freezing.cancel()
        await super().shutdown(sockets=sockets)


def listen_socket(config: uvicorn.Config, settings: Settings) -> socket.socket:
    """The listening socket, bound; accepted connections inherit its send buffer size (Linux)."""
    listener = config.bind_socket()
    if settings.socket_send_buffer_bytes:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, settings.socket_send_buffer_bytes)
    return listener


def _worker(settings_fields: dict[str, Any], listener: socket.socket) -> None:
    settings = Settings(**settings_fields)
    configure_logging(settings.log_level)
    serve(settings, sockets=[listener])


def _serve_workers(settings: Settings) -> None:
    listener = listen_socket(uvicorn_config(None, settings), settings)
    multiprocessing.allow_connection_pickling()
    spawn = multiprocessing.get_context("spawn")
    fields = settings.model_dump()
    workers = [
        spawn.Process(target=_worker, args=(fields, listener), name=f"sluice-worker-{n}")
        for n in range(settings.workers)
    ]
    for worker in workers:
        worker.start()

    def forward(signum: int, _frame: FrameType | None) -> None:
        for worker in workers:
            if worker.is_alive() and worker.pid is not None:
                os.kill(worker.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for worker in workers:
        worker.join()
    listener.close()
    if any(worker.exitcode for worker in workers):
        sys.exit(1)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sluice", description="Streaming-first realtime AI inference server."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser("serve", help="run the server (settings from SLUICE_* variables)")
    serve_cmd.add_argument("--host", help="address to bind (default 127.0.0.1, SLUICE_HOST)")
    serve_cmd.add_argument("--port", type=int, help="port to bind (default 8000, SLUICE_PORT)")
    serve_cmd.add_argument("--workers", type=int, help="worker processes (default 1)")
    serve_cmd.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    schema_cmd = commands.add_parser("schema", help="write the JSON Schema and AsyncAPI contract files")
    schema_cmd.add_argument("--out", type=Path, help="directory (default: protocol/schema in the package)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.command == "schema":
        from protocol import schema

        written = schema.write(args.out) if args.out is not None else schema.write()
        for path in written:
            print(path)
        return
    flags = {"host": args.host, "port": args.port, "workers": args.workers, "log_level": args.log_level}
    settings = Settings(**{name: value for name, value in flags.items() if value is not None})
    if settings.workers > 1 and not settings.redis_url:
        raise SystemExit(_WORKERS_NEED_REDIS.format(workers=settings.workers))
    configure_logging(settings.log_level)
    if settings.workers > 1:
        _serve_workers(settings)
    else:
        serve(settings)
