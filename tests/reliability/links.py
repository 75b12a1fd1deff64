"""Client connections to a session that can be cut like a network failure: WebSocket and SSE.

A `Link` is one attached transport of one session. `WsLink` speaks ``/v1/ws`` with the
`websockets` client; `SseLink` reads ``GET /v1/sessions/{id}/events`` over a raw asyncio socket
(a minimal HTTP/1.1 client with chunked decoding and an SSE parser, so the test owns the socket)
and sends through ``POST /v1/sessions/{id}/messages`` with httpx. `Link.kill` resets the TCP
connection at once (``SO_LINGER`` 0, then abort): no close frame, no FIN, unread data dropped —
what a client sees when its network goes away.

Every frame read is validated as a server message (`checks.parse_server_message`); `recv`
returns numbered events and ``pong``s (the ``welcome``, SSE comments and ``retry:`` are taken
care of here, and an SSE ``event: close`` or a closed WebSocket raises `LinkClosed`).
Test support: talks to 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.reliability.checks import parse_server_message

__all__ = ["Link", "LinkClosed", "SseLink", "WsLink", "open_sse_session", "reset"]

Event = dict[str, Any]
_RST = struct.pack("ii", 1, 0)


class LinkClosed(Exception):
    """The server ended the connection; ``code`` is its close code when it sent one."""

    def __init__(self, code: int | None, reason: str = "") -> None:
        super().__init__(f"closed {code} {reason}")
        self.code = code
        self.reason = reason


def reset(transport: asyncio.WriteTransport) -> None:
    """Drop a TCP connection with a reset: no close handshake, nothing flushed."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RST)
    transport.abort()


class Link:
    """One attached transport of a session."""

    transport_name = "?"
    welcome: Event | None = None

    async def recv(self, within: float) -> Event:
        raise NotImplementedError

    async def send(self, message: Event) -> None:
        raise NotImplementedError

    def kill(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# WebSocket


class WsLink(Link):
    transport_name = "ws"

    def __init__(self, connection: ClientConnection) -> None:
        self.ws = connection
        self.pongs: list[Event] = []

    @classmethod
    async def open(cls, ws_url: str, hello: Event | None, *, within: float = 10.0) -> WsLink:
        """Connect, send ``hello`` (``{}`` for a new session) and read the ``welcome``; with
        ``hello=None`` nothing is sent and nothing read (the server waits for a first message)."""
        connection = await connect(
            ws_url,
            subprotocols=["sluice.v1"],  # type: ignore[list-item]
            max_size=None,
            compression=None,
            open_timeout=within,
            ping_interval=None,
            close_timeout=1,
        )
        link = cls(connection)
        try:
            if hello is not None:
                await link.send({"type": "hello", "protocol": 1} | hello)
                first = await link._read(within)
                assert first["type"] == "welcome", f"first frame is not welcome: {first}"
                link.welcome = first
        except BaseException:
            link.kill()
            raise
        return link

    async def _read(self, within: float) -> Event:
        try:
            raw = await asyncio.wait_for(self.ws.recv(), within)
        except ConnectionClosed as exc:
            close = exc.rcvd
            raise LinkClosed(close.code if close else None, close.reason if close else "") from None
        return parse_server_message(raw)

    async def recv(self, within: float) -> Event:
        while True:
            event = await self._read(within)
            if event["type"] == "welcome":
                assert self.welcome is None, "a second welcome on one connection"
                self.welcome = event
                continue
            if event["type"] == "pong":
                self.pongs.append(event)
            return event

    async def send(self, message: Event | str | bytes) -> None:
        if isinstance(message, dict):
            await self.ws.send(orjson.dumps(message).decode())
        else:
            await self.ws.send(message)

    def kill(self) -> None:
        reset(self.ws.transport)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(), 2)
        self.kill()


# ---------------------------------------------------------------------------------------------
# SSE


async def open_sse_session(client: httpx.AsyncClient, base_url: str, body: Event | None = None) -> Event:
    """``POST /v1/sessions``: the ``welcome`` (validated)."""
    response = await client.post(f"{base_url}/v1/sessions", json=body or {})
    assert response.status_code == 201, f"POST /v1/sessions answered {response.status_code}: {response.text}"
    return parse_server_message(response.content)


class SseLink(Link):
    transport_name = "sse"

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        session: str,
        client: httpx.AsyncClient,
        base_url: str,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self.session = session
        self._client = client
        self._base_url = base_url
        self._chunked = False
        self._chunk_left = 0
        self._buffer = b""
        self._eof = False
        self.comments = 0

    @classmethod
    async def open(
        cls,
        client: httpx.AsyncClient,
        base_url: str,
        session: str,
        last_seq: int | None,
        *,
        via_query: bool = False,
        rcvbuf: int | None = None,
        within: float = 10.0,
    ) -> SseLink:
        """``GET /v1/sessions/{session}/events`` resuming after ``last_seq`` (``Last-Event-ID``, or
        the ``last_event_id`` query when ``via_query``); raises `LinkClosed` on a non-200 answer.
        ``rcvbuf`` shrinks the socket's receive buffer (a client that stops reading then blocks
        the server's writes sooner)."""
        url = urlsplit(base_url)
        host, port = url.hostname or "127.0.0.1", url.port or 80
        path = f"/v1/sessions/{session}/events"
        headers = [f"Host: {host}:{port}", "Accept: text/event-stream", "Cache-Control: no-cache"]
        if last_seq is not None:
            if via_query:
                path += f"?last_event_id={last_seq}"
            else:
                headers.append(f"Last-Event-ID: {last_seq}")
        request = f"GET {path} HTTP/1.1\r\n" + "\r\n".join(headers) + "\r\n\r\n"
        sock = None
        if rcvbuf is not None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.setblocking(False)
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (host, port)), within)
        opening = (
            asyncio.open_connection(sock=sock) if sock is not None else asyncio.open_connection(host, port)
        )
        reader, writer = await asyncio.wait_for(opening, within)
        link = cls(reader, writer, session, client, base_url)
        try:
            writer.write(request.encode())
            await asyncio.wait_for(link._head(), within)
        except BaseException:
            link.kill()
            raise
        return link

    async def _head(self) -> None:
        head = await self._reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        fields = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
        if status != 200:
            length = int(fields.get("content-length", "0") or 0)
            body = await self._reader.readexactly(length) if length else b""
            raise LinkClosed(status, body.decode("utf-8", "replace")[:300])
        assert fields.get("content-type", "").startswith("text/event-stream"), fields
        self._chunked = "chunked" in fields.get("transfer-encoding", "")

    async def _more(self) -> None:
        """Append the next piece of the body to the buffer."""
        if self._eof:
            raise LinkClosed(None, "stream ended")
        if not self._chunked:
            data = await self._reader.read(65536)
            if not data:
                self._eof = True
                raise LinkClosed(None, "stream ended")
            self._buffer += data
            return
        if self._chunk_left == 0:
            size_line = await self._reader.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                self._eof = True
                raise LinkClosed(None, "stream ended")
            self._chunk_left = size
        data = await self._reader.read(self._chunk_left)
        if not data:
            self._eof = True
            raise LinkClosed(None, "connection lost")
        self._chunk_left -= len(data)
        self._buffer += data
        if self._chunk_left == 0:
            await self._reader.readexactly(2)

    async def _line(self) -> str:
        while (end := self._buffer.find(b"\n")) < 0:
            await self._more()
        line = self._buffer[:end]
        self._buffer = self._buffer[end + 1 :]
        return line.decode("utf-8").removesuffix("\r")

    async def _event(self) -> tuple[str | None, str | None, str]:
        """The next dispatched event: ``(id, event, data)``."""
        event_id: str | None = None
        name: str | None = None
        data: list[str] = []
        while True:
            line = await self._line()
            if line == "":
                if data:
                    return event_id, name, "\n".join(data)
                event_id, name = None, None
                continue
            if line.startswith(":"):
                self.comments += 1
                continue
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "data":
                data.append(value)
            elif field == "event":
                name = value
            elif field == "id":
                event_id = value

    async def recv(self, within: float) -> Event:
        try:
            event_id, name, data = await asyncio.wait_for(self._event(), within)
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            raise LinkClosed(None, repr(exc)) from None
        if name == "close":
            close = orjson.loads(data)
            raise LinkClosed(close.get("code"), close.get("reason", ""))
        event = parse_server_message(data)
        assert name == event["type"], f"event: {name} carries a {event['type']}"
        if event["type"] == "pong":
            assert event_id is None, "pong must not move Last-Event-ID"
        else:
            assert event_id == str(event["seq"]), f"id: {event_id} for seq {event['seq']}"
        return event

    async def send(self, message: Event | list[Event]) -> None:
        url = f"{self._base_url}/v1/sessions/{self.session}/messages"
        response = await self._client.post(url, content=orjson.dumps(message))
        assert response.status_code in (202, 400, 409, 413, 422, 429), (
            f"POST messages answered {response.status_code}: {response.text[:300]}"
        )

    def kill(self) -> None:
        reset(self._writer.transport)

    async def close(self) -> None:
        self.kill()
