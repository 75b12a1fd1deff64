"""The httpx transport the Ollama backend sends through: pooled `Connection`s, no httpcore.

`UpstreamTransport` is an ``httpx.AsyncBaseTransport``, so the backend keeps one
``httpx.AsyncClient`` and httpx's request building, timeouts and response API; a test or an
embedder passes another transport to the backend's constructor, httpx style. It was chosen over
httpcore's pools (under an asyncio network backend) by measurement: less server CPU per relayed
token at 100 and 500 streams with the same p99 (figures in ``bench/results/README.md``).

What it does: one pool of keep-alive connections per origin (at most `max_connections`, waiting
for a slot up to httpx's ``pool`` timeout), idle connections reused most-recent first and dropped
after `keepalive_expiry`, or as soon as the server has closed them. A reused connection that fails
before a single response byte arrives (the server closed it as the request went out) is retried
once on a fresh one; nothing else is retried. The response body streams as it arrives; closing it
before its end closes the connection at once (that is how Ollama learns to stop generating), never
drains it. Connects honour the ``connect`` timeout; a read waits under the ``read`` timeout only
when httpx passes one and nothing is buffered (streamed generations pass none: `StallGuard`
bounds them). Every failure leaves as httpx's own exception (``ConnectError``, ``ConnectTimeout``,
``ReadError``, ``ReadTimeout``, ``WriteError``, ``WriteTimeout``, ``PoolTimeout``,
``RemoteProtocolError``), so ``errors.translate`` maps it.

It must never know about Ollama's payloads: bytes in, bytes out. No HTTP/2, proxies or upgrades.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from collections import deque
from collections.abc import AsyncIterable, Callable
from typing import Any, Self, cast

import httpx

from server.backends.ollama.net import Connection

__all__ = ["UpstreamTransport", "body_stream", "pipe_body"]


class _Pool:
    """The connections to one origin: idle ones most-recent last, a bound on all of them."""

    __slots__ = ("_address", "_all", "_idle", "_keepalive_s", "_limit", "_ssl", "_waiters")

    def __init__(
        self, address: tuple[str, int], ssl_context: ssl.SSLContext | None, limit: int, keepalive_s: float
    ) -> None:
        self._address = address
        self._ssl = ssl_context
        self._limit = limit
        self._keepalive_s = keepalive_s
        self._idle: deque[Connection] = deque()
        self._all: set[Connection] = set()
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self, timeouts: dict[str, Any], *, fresh: bool) -> Connection:
        loop = asyncio.get_running_loop()
        deadline = None if timeouts.get("pool") is None else loop.time() + timeouts["pool"]
        while True:
            now = loop.time()
            idle = self._idle
            while idle and now - idle[0].idle_since >= self._keepalive_s:
                self.discard(idle.popleft())
            while idle and not fresh:
                conn = idle.pop()
                if conn.reusable:
                    conn.reused = True
                    return conn
                self.discard(conn)
            if len(self._all) >= self._limit and idle:
                self.discard(idle.popleft())  # room for the fresh connection asked for
            if len(self._all) < self._limit:
                return await self._connect(loop, timeouts.get("connect"))
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout_at(deadline):
                    await waiter
            except BaseException as exc:
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()  # woken as we gave up: pass the free slot on
                waiter.cancel()
                if isinstance(exc, TimeoutError):
                    raise httpx.PoolTimeout("no upstream connection became free in time") from None
                raise

    def release(self, conn: Connection) -> None:
        """Give a connection back after its exchange: idle when reusable, else closed."""
        if not conn.reusable:
            self.discard(conn)
            return
        conn.finish()
        conn.idle_since = conn.loop.time()
        self._idle.append(conn)
        self._wake_one()

    def discard(self, conn: Connection) -> None:
        conn.finish()
        conn.close()
        if conn in self._all:
            self._all.discard(conn)
            self._wake_one()

    def close(self) -> None:
        for conn in list(self._all):
            self.discard(conn)
        self._idle.clear()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def _connect(self, loop: asyncio.AbstractEventLoop, limit_s: float | None) -> Connection:
        host, port = self._address
        placeholder = Connection(loop)  # holds the slot while connecting
        self._all.add(placeholder)
        try:
            async with asyncio.timeout(limit_s):
                _, conn = await loop.create_connection(
                    lambda: Connection(loop),
                    host,
                    port,
                    ssl=self._ssl,
                    server_hostname=host if self._ssl is not None else None,
                )
        except BaseException as exc:
            self._all.discard(placeholder)
            self._wake_one()  # the slot is free again
            if isinstance(exc, TimeoutError):  # before OSError: TimeoutError is one
                raise httpx.ConnectTimeout("timed out connecting to the upstream") from None
            if isinstance(exc, OSError | ssl.SSLError):
                raise httpx.ConnectError(str(exc) or type(exc).__name__) from exc
            raise
        self._all.discard(placeholder)
        self._all.add(conn)
        return conn


class _Body(httpx.AsyncByteStream):
    """A response body as it arrives; `aclose` before its end closes the connection."""

    __slots__ = ("_conn", "_pool", "_timeout")

    def __init__(self, pool: _Pool, conn: Connection, timeout: float | None) -> None:
        self._pool = pool
        self._conn: Connection | None = conn
        self._timeout = timeout

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> bytes:
        conn = self._conn
        if conn is None:
            raise StopAsyncIteration
        data = conn.take() or await conn.body(self._timeout)
        if data:
            return data
        await self.aclose()
        raise StopAsyncIteration

    async def pipe(self, sink: Callable[[bytes], None]) -> None:
        """Hand the whole (rest of the) body to ``sink`` as it arrives, from the connection's read
        callback (`Connection.pipe`); returns once it is complete, raises what ended it."""
        conn = self._conn
        if conn is None:
            return
        await conn.pipe(sink, self._timeout)
        await self.aclose()

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if conn.complete:
            self._pool.release(conn)
        else:
            self._pool.discard(conn)


class UpstreamTransport(httpx.AsyncBaseTransport):
    """HTTP/1.1 over pooled `Connection`s, at most `max_connections` per origin."""

    def __init__(
        self, *, max_connections: int, keepalive_expiry: float, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        self._limit = max_connections
        self._keepalive_s = keepalive_expiry
        self._ssl = ssl_context
        self._pools: dict[tuple[str, str, int], _Pool] = {}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts: dict[str, Any] = request.extensions.get("timeout", {})
        pool = self._pool(request.url)
        payload = _head(request) + await _body(request)
        fresh = False
        while True:
            conn = await pool.acquire(timeouts, fresh=fresh)
            conn.begin(head_only=request.method == "HEAD")
            try:
                conn.send(payload)
                await conn.drain(timeouts.get("write"))
                await conn.head(timeouts.get("read"))
            except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError):
                pool.discard(conn)
                if conn.reused and not conn.received and not fresh:
                    # The server closed this idle connection as the request went out.
                    fresh = True
                    continue
                raise
            except BaseException:
                pool.discard(conn)
                raise
            return httpx.Response(
                conn.status,
                headers=conn.headers,
                stream=_Body(pool, conn, timeouts.get("read")),
                extensions={"http_version": b"HTTP/1.1", "reason_phrase": conn.reason},
            )

    async def aclose(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()

    def _pool(self, url: httpx.URL) -> _Pool:
        scheme = url.scheme
        if scheme not in ("http", "https"):
            raise httpx.UnsupportedProtocol(f"unsupported URL scheme {scheme!r}")
        port = url.port or (443 if scheme == "https" else 80)
        key = (scheme, url.host, port)
        pool = self._pools.get(key)
        if pool is None:
            context = (self._ssl or _default_tls()) if scheme == "https" else None
            pool = self._pools[key] = _Pool((url.host, port), context, self._limit, self._keepalive_s)
        return pool


def body_stream(response: httpx.Response) -> AsyncIterable[bytes]:
    """A streamed response's body, piece by piece as it arrives, decoded.

    An unencoded body (what Ollama sends) is read straight from the transport's stream: httpx's
    ``aiter_bytes`` would wrap each read in three more async generators (byte counting, an
    identity decoder, a re-chunker) that change nothing. A body with a ``Content-Encoding`` goes
    through ``aiter_bytes``, which decodes it. Closing the response closes either.
    """
    stream = response.stream
    if "content-encoding" not in response.headers and isinstance(stream, httpx.AsyncByteStream):
        return stream
    return response.aiter_bytes()


async def pipe_body(response: httpx.Response, sink: Callable[[bytes], None]) -> None:
    """`body_stream`'s pieces handed to ``sink`` as they arrive: from the connection's read
    callback when the body is an unencoded one of this transport's (the awaiting task is woken
    only when it ends), else read by the awaiting task. Closing the response closes either."""
    stream = response.stream
    if "content-encoding" not in response.headers and isinstance(stream, _Body):
        await stream.pipe(sink)
        return
    async for data in body_stream(response):
        sink(data)


@functools.cache
def _default_tls() -> ssl.SSLContext:
    # Loading the CA bundle takes ~50 ms: once per process, and only for an https upstream.
    return httpx.create_ssl_context()


def _head(request: httpx.Request) -> bytes:
    lines = [request.method.encode("ascii"), b" ", request.url.raw_path, b" HTTP/1.1\r\n"]
    for name, value in request.headers.raw:
        lines += (name, b": ", value, b"\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


async def _body(request: httpx.Request) -> bytes:
    try:
        body = request.content
    except httpx.RequestNotRead:
        body = b"".join([part async for part in cast(httpx.AsyncByteStream, request.stream)])
    if b"chunked" in request.headers.get("transfer-encoding", "").encode("latin-1").lower():
        return (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"
    return body
