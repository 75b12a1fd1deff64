"""A minimal HTTP/1.1 keep-alive client on asyncio streams, used as the benchmarks' load generator.

Why not httpx: on a 2-core machine the load generator shares the CPU with the server it measures,
and httpx spends several times more CPU per request than this. Every HTTP target (sluice, the
seed service, infinity-emb, the Ollama emulator) is driven by this same client, so the comparison
stays fair. It speaks just enough HTTP: one request at a time per connection, bodies framed by
Content-Length, chunked encoding, or connection close. Never use it outside the benchmarks.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

import orjson

__all__ = ["HttpConnection", "HttpError", "Response", "iter_lines", "iter_sse"]


class HttpError(RuntimeError):
    """A response the benchmark did not expect (status, framing)."""


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> object:
        return orjson.loads(self.body)


class HttpConnection:
    """One keep-alive connection to 127.0.0.1:port; reconnects when the server closed it."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def _ensure(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._reader is None or self._writer is None or self._writer.is_closing():
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port, limit=1 << 22)
        return self._reader, self._writer

    async def connect(self) -> None:
        """Open the connection now, so a timed request does not pay for the TCP handshake."""
        await self._ensure()

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            try:
                await self._writer.wait_closed()
            except (ConnectionError, OSError):
                pass
        self._reader = self._writer = None

    async def _send(
        self, method: str, path: str, body: bytes | None, headers: Mapping[str, str] | None
    ) -> tuple[asyncio.StreamReader, int, dict[str, str]]:
        reader, writer = await self._ensure()
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        if body is not None:
            lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        lines += [f"{key}: {value}" for key, value in (headers or {}).items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b""))
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split(" ", 2)[1])
        parsed: dict[str, str] = {}
        for line in header_lines:
            if ":" in line:
                key, value = line.split(":", 1)
                parsed[key.strip().lower()] = value.strip()
        return reader, status, parsed

    async def _body(self, reader: asyncio.StreamReader, headers: dict[str, str]) -> AsyncIterator[bytes]:
        if headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    while (await reader.readuntil(b"\r\n")) != b"\r\n":
                        pass
                    break
                chunk = await reader.readexactly(size + 2)
                yield chunk[:-2]
        elif "content-length" in headers:
            yield await reader.readexactly(int(headers["content-length"]))
        else:
            while chunk := await reader.read(65536):
                yield chunk
            await self.close()
            return
        if headers.get("connection", "").lower() == "close":
            await self.close()

    async def request(
        self,
        method: str,
        path: str,
        json: object = None,
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        body = orjson.dumps(json) if json is not None else None
        reader, status, parsed = await self._send(method, path, body, headers)
        parts = [part async for part in self._body(reader, parsed)]
        return Response(status, parsed, b"".join(parts))

    async def stream(
        self,
        method: str,
        path: str,
        json: object = None,
        headers: Mapping[str, str] | None = None,
    ) -> AsyncIterator[tuple[float, bytes]]:
        """Yield `(perf_counter at arrival, chunk)` for each body chunk as it is read."""
        body = orjson.dumps(json) if json is not None else None
        reader, status, parsed = await self._send(method, path, body, headers)
        if status >= 300:
            rest = b"".join([part async for part in self._body(reader, parsed)])
            raise HttpError(f"{method} {path}: {status} {rest[:200]!r}")
        finished = False
        try:
            async for chunk in self._body(reader, parsed):
                yield time.perf_counter(), chunk
            finished = True
        finally:
            if not finished:
                # Left mid-body: the connection cannot carry another request.
                await self.close()


async def iter_lines(chunks: AsyncIterator[tuple[float, bytes]]) -> AsyncIterator[tuple[float, bytes]]:
    """Split a timed chunk stream on newlines (NDJSON); each line keeps its chunk's arrival time."""
    pending = b""
    async for at, chunk in chunks:
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if line.strip():
                yield at, line
    if pending.strip():
        yield time.perf_counter(), pending


async def iter_sse(
    chunks: AsyncIterator[tuple[float, bytes]],
) -> AsyncIterator[tuple[float, dict[str, str]]]:
    """Parse a timed chunk stream as server-sent events: `(arrival, {"data", "event", "id"})`."""
    pending = b""
    async for at, chunk in chunks:
        # CRLF may be cut between chunks: normalise the joined bytes, holding back a trailing CR.
        pending = (pending + chunk).replace(b"\r\n", b"\n")
        held = b"\r" if pending.endswith(b"\r") else b""
        *events, pending = pending[: len(pending) - len(held)].split(b"\n\n")
        pending += held
        for raw in events:
            fields: dict[str, str] = {}
            data: list[str] = []
            for line in raw.decode().split("\n"):
                if not line or line.startswith(":"):
                    continue
                key, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if key == "data":
                    data.append(value)
                else:
                    fields[key] = value
            if data:
                fields["data"] = "\n".join(data)
                yield at, fields
