"""Benchmark clients for one sluice session, over WebSocket or over SSE + POST (PROTOCOL.md §3).

Both expose the same small surface: `open()`, `submit(request, on_event)` returning a future of the
request's terminal message, and `close()`. Every server message is timestamped (`perf_counter`) the
moment it is read and handed to the request's `on_event` before anything else happens to it, so
arrival times measure the server, not this client's bookkeeping. These clients are for
measurements only; they do not resume, retry or validate beyond what a benchmark needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Callable
from typing import Any, Protocol

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from bench.rawhttp import HttpConnection, HttpError, iter_sse
from bench.rawws import WsClosed, WsConnection

__all__ = ["EventHandler", "RawWsSession", "SessionClosed", "SseSession", "WsSession"]

Message = dict[str, Any]
EventHandler = Callable[[float, Message], None]
TERMINAL = frozenset({"done", "embedding", "classification", "error"})
_ids = itertools.count()


class SessionClosed(ConnectionError):
    """The transport ended while requests were still in flight."""


class _Demux:
    """Routes timestamped server messages to the request they belong to (by `id`, else `ref`)."""

    def __init__(self) -> None:
        self.pending: dict[str, tuple[EventHandler | None, asyncio.Future[Message]]] = {}

    def expect(self, request_id: str, on_event: EventHandler | None) -> asyncio.Future[Message]:
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self.pending[request_id] = (on_event, future)
        return future

    def route(self, at: float, message: Message) -> None:
        key = message.get("id") or message.get("ref")
        entry = self.pending.get(key) if isinstance(key, str) else None
        if entry is None:
            return
        on_event, future = entry
        if on_event is not None:
            on_event(at, message)
        if message.get("type") in TERMINAL:
            del self.pending[key]
            if not future.done():
                future.set_result(message)

    def fail_all(self, reason: str) -> None:
        for _, future in self.pending.values():
            if not future.done():
                future.set_exception(SessionClosed(reason))
        self.pending.clear()


class _Socket(Protocol):
    async def send(self, message: str) -> None: ...
    async def recv(self) -> str | bytes: ...


async def _greet(ws: _Socket, hello: bool, limit_s: float) -> Message:
    """`hello` (unless told not to), then the `welcome`, which must come first."""
    if hello:
        await ws.send(orjson.dumps({"type": "hello", "protocol": 1, "client": "sluice-bench"}).decode())
    welcome = orjson.loads(await asyncio.wait_for(ws.recv(), limit_s))
    if welcome.get("type") != "welcome":
        raise SessionClosed(f"expected welcome first, got {welcome.get('type')!r}")
    assert isinstance(welcome, dict)
    return welcome


def new_id(prefix: str = "r") -> str:
    return f"{prefix}{next(_ids)}"


class WsSession:
    """One WebSocket session on `GET /v1/ws`: `hello` (optional), `welcome` first, then requests."""

    def __init__(self, url: str, *, hello: bool = True, compression: str | None = "deflate") -> None:
        self.url = url
        self.hello = hello
        self.compression = compression
        self.welcome: Message = {}
        self._ws: ClientConnection | None = None
        self._demux = _Demux()
        self._reader: asyncio.Task[None] | None = None

    @property
    def extensions(self) -> list[str]:
        return [ext.name for ext in self._ws.protocol.extensions] if self._ws is not None else []

    async def open(self, limit_s: float = 30.0) -> Message:
        self._ws = await connect(
            self.url,
            subprotocols=["sluice.v1"],  # type: ignore[list-item]
            compression=self.compression,
            max_size=None,
            ping_interval=None,  # the server pings; an idle benchmark client stays silent
            open_timeout=limit_s,
            close_timeout=2,
        )
        self.welcome = welcome = await _greet(self._ws, self.hello, limit_s)
        self._reader = asyncio.create_task(self._read())
        return welcome

    async def _read(self) -> None:
        assert self._ws is not None
        try:
            async for raw in self._ws:
                at = time.perf_counter()
                self._demux.route(at, orjson.loads(raw))
        except ConnectionClosed:
            pass
        finally:
            self._demux.fail_all("websocket closed")

    async def submit(self, request: Message, on_event: EventHandler | None = None) -> asyncio.Future[Message]:
        """Send `request` (which must carry an `id`); the future resolves with its terminal message."""
        assert self._ws is not None, "open() first"
        future = self._demux.expect(request["id"], on_event)
        await self._ws.send(orjson.dumps(request).decode())
        return future

    async def close(self) -> None:
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await self._ws.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader


class RawWsSession:
    """`WsSession`'s surface over `bench.rawws` (a reader that costs what the SSE reader costs), for
    benchmarks that compare the transports rather than the client libraries."""

    def __init__(self, port: int, *, hello: bool = True) -> None:
        self.hello = hello
        self.welcome: Message = {}
        self._ws = WsConnection(port, "/v1/ws", subprotocol="sluice.v1")
        self._demux = _Demux()
        self._reader: asyncio.Task[None] | None = None

    async def open(self, limit_s: float = 30.0) -> Message:
        await asyncio.wait_for(self._ws.open(), limit_s)
        self.welcome = welcome = await _greet(self._ws, self.hello, limit_s)
        self._reader = asyncio.create_task(self._read())
        return welcome

    async def _read(self) -> None:
        try:
            while True:
                raw = await self._ws.recv()
                self._demux.route(time.perf_counter(), orjson.loads(raw))
        except (WsClosed, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._demux.fail_all("websocket closed")

    async def submit(self, request: Message, on_event: EventHandler | None = None) -> asyncio.Future[Message]:
        future = self._demux.expect(request["id"], on_event)
        await self._ws.send(orjson.dumps(request).decode())
        return future

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        await self._ws.close()


class SseSession:
    """One session over the SSE fallback: `POST /v1/sessions`, an events stream, `POST .../messages`."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.welcome: Message = {}
        self._control = HttpConnection(port)
        self._events = HttpConnection(port)
        self._demux = _Demux()
        self._reader: asyncio.Task[None] | None = None

    async def open(self, limit_s: float = 30.0) -> Message:
        response = await asyncio.wait_for(
            self._control.request("POST", "/v1/sessions", {"protocol": 1, "client": "sluice-bench"}), limit_s
        )
        if response.status != 201:
            raise HttpError(f"POST /v1/sessions: {response.status} {response.body[:200]!r}")
        welcome = response.json()
        assert isinstance(welcome, dict)
        self.welcome = welcome
        self._reader = asyncio.create_task(self._read(f"/v1/sessions/{welcome['session']}/events"))
        return welcome

    async def _read(self, path: str) -> None:
        try:
            stream = self._events.stream("GET", path, headers={"Accept": "text/event-stream"})
            async for at, event in iter_sse(stream):
                self._demux.route(at, orjson.loads(event["data"]))
        except (ConnectionError, OSError, asyncio.IncompleteReadError, HttpError):
            pass
        finally:
            self._demux.fail_all("event stream ended")

    async def submit(self, request: Message, on_event: EventHandler | None = None) -> asyncio.Future[Message]:
        future = self._demux.expect(request["id"], on_event)
        path = f"/v1/sessions/{self.welcome['session']}/messages"
        response = await self._control.request("POST", path, request)
        if response.status != 202:
            self._demux.pending.pop(request["id"], None)
            raise HttpError(f"POST {path}: {response.status} {response.body[:200]!r}")
        return future

    async def close(self) -> None:
        if self.welcome:
            with contextlib.suppress(Exception):
                await self._control.request("DELETE", f"/v1/sessions/{self.welcome['session']}")
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        await self._events.close()
        await self._control.close()
