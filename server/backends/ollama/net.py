"""httpcore's network layer for the Ollama pools, on plain asyncio protocols: no timer per read.

httpcore reads a streamed body one network read at a time, and its default backend (anyio) wraps
every read in a cancel scope with a deadline and pauses and resumes the transport around it. At
one read per token for hundreds of streams that bookkeeping is about a quarter of the reading
task's CPU (uvloop, one chunk per token: ~50 µs against ~38 µs per chunk through httpx, measured
on this machine). `LoopBackend` gives the pools the same streams over `asyncio.Protocol`: bytes
are buffered as they arrive (reading pauses past `HIGH_WATER` buffered bytes and resumes below
`LOW_WATER`), and a read waits on one future only when nothing is buffered.

A read arms a timer only when httpcore passes a read timeout (one-shot calls: embed, tags,
version) *and* it has to wait. Streamed generations pass none: `StallGuard` bounds them, one
timer per stream. Connects are bounded by their timeout as before. Errors leave as httpcore's own
exceptions (``ConnectError``, ``ConnectTimeout``, ``ReadError``, ``ReadTimeout``, ``WriteError``,
``WriteTimeout``), which httpx maps as it does for its default backend.

This module knows nothing of Ollama, HTTP or sluice: it only moves bytes.
"""

# httpcore's interface names its deadlines ``timeout``, so these methods must too.
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import socket
import ssl
from collections import deque
from collections.abc import Iterable
from typing import Any, cast

import httpcore

__all__ = ["HIGH_WATER", "LOW_WATER", "LoopBackend", "LoopStream"]

# Bytes buffered before the transport stops reading (and below which it reads again). A token
# stream never comes near them; a large embedding body passes through in a few reads.
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024

SocketOption = tuple[int, int, int] | tuple[int, int, bytes | bytearray] | tuple[int, int, None, int]


class _Reader(asyncio.Protocol):
    """The receiving half: buffers what arrives, wakes the one reader waiting."""

    __slots__ = (
        "_chunks",
        "_drain",
        "_eof",
        "_error",
        "_lost",
        "_paused",
        "_size",
        "_waiter",
        "_write_paused",
        "loop",
        "transport",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._eof = False
        self._lost = False
        self._error: Exception | None = None
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not derive from asyncio's classes; they have the same methods.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        if self._size > HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return False  # an HTTP/1.1 client has nothing left to say once the server is done

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._error = exc
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

    # -- for LoopStream ----------------------------------------------------------------------

    @property
    def readable(self) -> bool:
        """Whether a read would return at once (data, end of stream or a lost connection)."""
        return bool(self._chunks) or self._eof or self._lost

    async def read(self, max_bytes: int, timeout: float | None) -> bytes:
        if not self._chunks:
            if self._eof or self._lost:
                return self._end()
            waiter = self._waiter = self.loop.create_future()
            try:
                if timeout is None:
                    await waiter
                else:
                    async with asyncio.timeout(timeout):
                        await waiter
            except TimeoutError:
                raise httpcore.ReadTimeout("timed out waiting for data") from None
            finally:
                self._waiter = None
            if not self._chunks:
                return self._end()  # end of stream, a lost connection, or our own close
        return self._take(max_bytes)

    async def drain(self, timeout: float | None) -> None:
        while self._write_paused and not self._lost:
            drain = self._drain = self.loop.create_future()
            try:
                async with asyncio.timeout(timeout):
                    await drain
            except TimeoutError:
                raise httpcore.WriteTimeout("timed out sending data") from None
            finally:
                self._drain = None

    @property
    def lost(self) -> bool:
        return self._lost

    def _end(self) -> bytes:
        """What a read gets once nothing more will arrive: b"" at a clean end, else an error."""
        if self._error is not None:
            raise httpcore.ReadError(str(self._error) or type(self._error).__name__)
        return b""

    def _take(self, max_bytes: int) -> bytes:
        chunks = self._chunks
        first = chunks.popleft()
        if len(first) > max_bytes:
            chunks.appendleft(first[max_bytes:])
            first = first[:max_bytes]
        elif chunks and len(first) + len(chunks[0]) <= max_bytes:
            # Several pieces arrived while the reader was busy: one read hands them all over,
            # which saves the layers above a trip each.
            parts = [first]
            size = len(first)
            while chunks and size + len(chunks[0]) <= max_bytes:
                size += len(chunks[0])
                parts.append(chunks.popleft())
            first = b"".join(parts)
        self._size -= len(first)
        if self._paused and self._size < LOW_WATER and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return first

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class LoopStream(httpcore.AsyncNetworkStream):
    """One connection as httpcore sees it."""

    __slots__ = ("_reader", "_transport")

    def __init__(self, transport: asyncio.Transport, reader: _Reader) -> None:
        self._transport = transport
        self._reader = reader

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return await self._reader.read(max_bytes, timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        if self._transport.is_closing():
            raise httpcore.WriteError("connection closed")
        self._transport.write(buffer)
        await self._reader.drain(timeout)
        if self._reader.lost:
            raise httpcore.WriteError("connection lost while sending")

    async def aclose(self) -> None:
        # close(), not abort(): what is already written still goes out, then FIN. An upstream
        # (Ollama) sees the connection end and stops generating.
        self._transport.close()
        self._reader._wake()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        loop = self._reader.loop
        try:
            async with asyncio.timeout(timeout):
                transport = await loop.start_tls(
                    self._transport, self._reader, ssl_context, server_hostname=server_hostname
                )
        except TimeoutError:
            self._transport.abort()
            raise httpcore.ConnectTimeout("TLS handshake timed out") from None
        except (OSError, ssl.SSLError) as exc:
            self._transport.abort()
            raise httpcore.ConnectError(str(exc) or type(exc).__name__) from exc
        assert transport is not None
        self._reader.transport = transport
        return LoopStream(transport, self._reader)

    def get_extra_info(self, info: str) -> Any:
        match info:
            case "ssl_object":
                return self._transport.get_extra_info("ssl_object")
            case "client_addr":
                return self._transport.get_extra_info("sockname")
            case "server_addr":
                return self._transport.get_extra_info("peername")
            case "socket":
                return self._transport.get_extra_info("socket")
            case "is_readable":
                # httpcore asks this of idle keep-alive connections: anything readable there
                # (data, EOF, a reset) means the server closed it.
                return self._reader.readable
            case _:
                return None


class LoopBackend(httpcore.AsyncNetworkBackend):
    """Opens `LoopStream` connections; pass it as ``AsyncConnectionPool(network_backend=...)``."""

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[SocketOption] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        local = (local_address, 0) if local_address else None
        return await _connect(
            loop.create_connection(lambda: _Reader(loop), host, port, local_addr=local),
            timeout,
            socket_options,
        )

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[SocketOption] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        return await _connect(
            loop.create_unix_connection(lambda: _Reader(loop), path), timeout, socket_options
        )

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


async def _connect(
    opening: Any,
    timeout: float | None,
    socket_options: Iterable[SocketOption] | None,
) -> LoopStream:
    try:
        async with asyncio.timeout(timeout):
            transport, reader = await opening
    except TimeoutError:  # before OSError: TimeoutError is one
        raise httpcore.ConnectTimeout("timed out connecting") from None
    except OSError as exc:
        raise httpcore.ConnectError(str(exc) or type(exc).__name__) from exc
    if socket_options:
        sock: socket.socket = transport.get_extra_info("socket")
        try:
            for option in socket_options:
                sock.setsockopt(*option)
        except OSError as exc:
            transport.abort()
            raise httpcore.ConnectError(str(exc)) from exc
    return LoopStream(transport, reader)
