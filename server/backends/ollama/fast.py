"""HTTP/1.1 to Ollama on pooled asyncio protocols parsed by httptools: an httpx transport, no httpcore.

Reading a token stream through httpcore + h11 cost ~38 µs of CPU per upstream chunk (chunked
framing and h11's event machinery in Python); llhttp (through ``httptools``) parses the same chunk
inside ``data_received`` for a few µs. `FastTransport` is an ``httpx.AsyncBaseTransport``, so the
backend keeps one ``httpx.AsyncClient`` and httpx's request building, timeouts and response API.

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
``RemoteProtocolError``), so ``errors.translate`` maps it as before.

It must never know about Ollama's payloads: bytes in, bytes out. No HTTP/2, proxies or upgrades.
"""

# httpx's interface names its deadlines ``timeout``.
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import functools
import ssl
from collections import deque
from typing import Any, Self, cast

import httptools
import httpx

from server.backends.ollama.net import HIGH_WATER, LOW_WATER

__all__ = ["Connection", "FastTransport"]

_NO_RESPONSE = "Server disconnected without sending a response."
_INCOMPLETE = "peer closed connection without sending complete message body"


class Connection(asyncio.Protocol):
    """One upstream connection and the response it is receiving, fed by the loop's callbacks.

    `begin` starts an exchange (a fresh parser); the bytes that arrive are parsed at once in
    `data_received` and the body pieces wait in a buffer until the reader takes them with `take`
    (or `body` when it has to wait). `reusable` says, once the response is complete, whether the
    connection may carry another request.
    """

    __slots__ = (
        "_chunks",
        "_drain",
        "_head_only",
        "_informational",
        "_length_known",
        "_parser",
        "_paused",
        "_size",
        "_waiter",
        "_write_paused",
        "complete",
        "eof",
        "error",
        "headers",
        "headers_done",
        "idle_since",
        "keep_alive",
        "loop",
        "lost",
        "lost_error",
        "reason",
        "received",
        "reused",
        "status",
        "stray",
        "transport",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self._parser: httptools.HttpResponseParser | None = None
        self._chunks: list[bytes] = []
        self._size = 0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._head_only = False
        self._informational = False
        self._length_known = False
        self.status = 0
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.headers_done = False
        self.complete = False
        self.keep_alive = False
        self.received = False  # any byte of the current response
        self.error: httpx.TransportError | None = None
        self.eof = False
        self.lost = False
        self.lost_error: Exception | None = None
        self.stray = False  # bytes arrived while no request was out: never reuse
        self.reused = False
        self.idle_since = 0.0

    # -- exchange --------------------------------------------------------------------------------

    def begin(self, *, head_only: bool) -> None:
        """Ready a new response; call before sending its request."""
        self._parser = httptools.HttpResponseParser(self)
        self._chunks = []
        self._size = 0
        self._head_only = head_only
        self._informational = False
        self._length_known = False
        self.status = 0
        self.reason = b""
        self.headers = []
        self.headers_done = False
        self.complete = False
        self.keep_alive = False
        self.received = False
        self.error = None

    def finish(self) -> None:
        """The exchange is over (the connection is going idle or closing)."""
        self._parser = None
        self._chunks = []
        self._size = 0
        self._resume()

    @property
    def reusable(self) -> bool:
        return (
            self.complete
            and self.keep_alive
            and not (self.eof or self.lost or self.stray)
            and self.transport is not None
            and not self.transport.is_closing()
        )

    def send(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing() or self.lost:
            raise httpx.WriteError("connection closed")
        transport.write(data)

    async def drain(self, timeout: float | None) -> None:
        while self._write_paused and not self.lost:
            drain = self._drain = self.loop.create_future()
            try:
                async with asyncio.timeout(timeout):
                    await drain
            except TimeoutError:
                raise httpx.WriteTimeout("timed out sending the request") from None
            finally:
                self._drain = None
        if self.lost and not self.received:
            raise httpx.WriteError("connection lost while sending the request")

    async def head(self, timeout: float | None) -> None:
        """Wait until the status line and headers are in; raise what ended the exchange first."""
        while not self.headers_done:
            if self.error is not None or self.eof or self.lost:
                raise self._failure()
            await self._wait(timeout)

    def take(self) -> bytes:
        """Every body byte buffered now (b"" when none)."""
        chunks = self._chunks
        if not chunks:
            return b""
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self._chunks = []
        self._size = 0
        self._resume()
        return data

    async def body(self, timeout: float | None) -> bytes:
        """The next body bytes, waiting if need be; b"" once the body is complete."""
        while not self._chunks:
            if self.complete:
                return b""
            if self.error is not None or self.eof or self.lost:
                raise self._failure()
            await self._wait(timeout)
        return self.take()

    def close(self) -> None:
        # close(), not abort(): the FIN goes out now (nothing is left to write), so the upstream
        # sees the client leave on its next write and stops generating.
        if self.transport is not None:
            self.transport.close()
        self._wake()

    async def _wait(self, timeout: float | None) -> None:
        waiter = self._waiter = self.loop.create_future()
        try:
            if timeout is None:
                await waiter
            else:
                async with asyncio.timeout(timeout):
                    await waiter
        except TimeoutError:
            raise httpx.ReadTimeout("timed out waiting for the upstream") from None
        finally:
            self._waiter = None

    def _failure(self) -> httpx.TransportError:
        if self.error is not None:
            return self.error
        if self.lost_error is not None:
            return httpx.ReadError(str(self.lost_error) or type(self.lost_error).__name__)
        if not self.headers_done:
            return httpx.RemoteProtocolError(_NO_RESPONSE)
        return httpx.RemoteProtocolError(_INCOMPLETE)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _resume(self) -> None:
        if self._paused and self._size < LOW_WATER and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()

    # -- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not derive from asyncio's classes; they have the same methods.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if parser is None or self.complete:
            self.stray = True
            return
        self.received = True
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._protocol_error("the upstream switched protocols")
        except httptools.HttpParserError as exc:
            self._protocol_error(f"malformed response from the upstream ({type(exc).__name__})")
        if self._size > HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        if self.headers_done and not self.complete and not self._length_known and self.error is None:
            # No Content-Length and not chunked: the body runs to the end of the connection.
            self.complete = True
            self.keep_alive = False
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.lost_error = exc
        self._wake()
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)

    # -- httptools callbacks ---------------------------------------------------------------------

    # llhttp parses on past the end of a message when more bytes came in the same read; those
    # belong to no request of ours, so every callback drops them once the response is complete.

    def on_status(self, reason: bytes) -> None:
        if self.complete:
            self.stray = True
            return
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.complete:
            self.stray = True
            return
        lowered = name.lower()
        if lowered == b"content-length" or (lowered == b"transfer-encoding" and b"chunked" in value.lower()):
            self._length_known = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self.complete or self._parser is None:
            self.stray = True
            return
        status = self._parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self._informational = True  # 100 Continue and friends: the real answer follows
            return
        self.status = status
        self.headers_done = True
        self.keep_alive = self._parser.should_keep_alive()
        if self._head_only or status in (204, 304):
            self._length_known = True
            if self._head_only:
                # llhttp cannot be told a response answers HEAD; stop here and never reuse.
                self.complete = True
                self.keep_alive = False
                self._parser = None

    def on_body(self, body: bytes) -> None:
        if self.complete:
            self.stray = True
            return
        self._chunks.append(body)
        self._size += len(body)

    def on_message_complete(self) -> None:
        if self.complete:
            self.stray = True
            return
        if self._informational:
            self._informational = False
            self.headers = []
            self.reason = b""
            self._length_known = False
            return
        self.complete = True
        # Anything after this message in the same read is not ours: parse no further.
        self._parser = None

    def _protocol_error(self, message: str) -> None:
        if self.complete:
            self.stray = True  # junk after a complete response: the response stands
        elif self.error is None:
            self.error = httpx.RemoteProtocolError(message)
        if self.transport is not None:
            self.transport.close()


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

    async def _connect(self, loop: asyncio.AbstractEventLoop, timeout: float | None) -> Connection:
        host, port = self._address
        placeholder = Connection(loop)  # holds the slot while connecting
        self._all.add(placeholder)
        try:
            async with asyncio.timeout(timeout):
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

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if conn.complete:
            self._pool.release(conn)
        else:
            self._pool.discard(conn)


class FastTransport(httpx.AsyncBaseTransport):
    """HTTP/1.1 over pooled asyncio connections, at most `max_connections` per origin."""

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
