"""One HTTP/1.1 connection to an upstream: an asyncio protocol whose bytes httptools parses.

`Connection` is fed by the event loop's callbacks: every read is parsed at once inside
``data_received`` (llhttp, through ``httptools``, in C: no Python event per chunk as with h11),
and the body pieces wait in a buffer until the reading task takes them (`take`, or `body` when
it has to wait); pieces that arrived while the reader was busy come out joined, in one take.
Or the reader `pipe`s the body: each piece goes to its callback from ``data_received`` itself,
and the reading task is woken only when the body ends. Reading pauses past `HIGH_WATER`
buffered bytes and resumes below `LOW_WATER`. A read arms a timer only when it is given a
timeout *and* has to wait: streamed generations pass none (`StallGuard` bounds them, one timer
per stream), so a token costs no timer.

Every failure is one of httpx's own exceptions (``ReadError``, ``ReadTimeout``, ``WriteError``,
``WriteTimeout``, ``RemoteProtocolError``), so ``errors.translate`` maps them as for any httpx
transport. This module must never know about Ollama's payloads, pools or retries (that is
`server.backends.ollama.transport`): bytes in, bytes out, one exchange at a time.
"""

# httpx's interface names its deadlines ``timeout``.
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast

import httptools
import httpx

__all__ = ["HIGH_WATER", "LOW_WATER", "Connection"]

# Bytes buffered before the transport stops reading (and below which it reads again). A token
# stream never comes near them; a large embedding body passes through in a few reads.
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024

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
        "_sink",
        "_sink_error",
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
        # While `pipe` runs: who takes body bytes as they are parsed, and what it raised.
        self._sink: Callable[[bytes], None] | None = None
        self._sink_error: Exception | None = None
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

    async def pipe(self, sink: Callable[[bytes], None], timeout: float | None) -> None:
        """Hand the rest of the body to ``sink`` (what is queued now, then each piece as it is
        parsed, from the read callback: no wake-up of the awaiting task per read), until the body
        is complete; raise what ended it otherwise, or what ``sink`` raised (no byte is handed on
        after that). ``timeout`` bounds each wait, which only the end of the body ends."""
        chunks, self._chunks, self._size = self._chunks, [], 0
        self._resume()
        try:
            for chunk in chunks:
                sink(chunk)
            self._sink = sink
            while not self.complete:
                if self._sink_error is not None:
                    raise self._sink_error
                if self.error is not None or self.eof or self.lost:
                    raise self._failure()
                await self._wait(timeout)
            if self._sink_error is not None:
                raise self._sink_error
        finally:
            self._sink = None
            self._sink_error = None

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
        if self._sink is None or self.complete or self.error is not None:
            self._wake()  # a piped body wakes its reader only when it ends

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
        sink = self._sink
        if sink is not None:
            try:
                sink(body)
            except Exception as exc:  # the reader raises it; nothing more is handed on
                self._sink = None
                self._sink_error = exc
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
