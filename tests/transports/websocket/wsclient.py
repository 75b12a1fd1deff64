"""A small protocol-aware WebSocket test client over the `websockets` library.

It keeps every event it has read, remembers the newest seq (what a resuming client sends as
``last_seq``), and can drop its TCP connection without a close handshake (`kill`), which is how
the tests simulate a network failure mid-stream.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Iterable
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

__all__ = ["Client", "close_code", "terminal_of", "text_of"]

Event = dict[str, Any]
TERMINAL_TYPES = ("done", "embedding", "classification")


def is_terminal(event: Event) -> bool:
    return event["type"] in TERMINAL_TYPES or (event["type"] == "error" and "id" in event)


def terminal_of(events: Iterable[Event], request_id: str) -> Event | None:
    ends = [e for e in events if e.get("id") == request_id and is_terminal(e)]
    assert len(ends) <= 1, f"{len(ends)} terminal messages for {request_id}"
    return ends[0] if ends else None


def text_of(events: Iterable[Event], request_id: str) -> str:
    return "".join(e["text"] for e in events if e["type"] == "delta" and e["id"] == request_id)


def close_code(connection: ClientConnection) -> int | None:
    """The code of the close frame the server sent; None if none arrived (the TCP connection
    just ended, or is still open)."""
    close = connection.protocol.close_rcvd
    return close.code if close is not None else None


class Client:
    """One connection; `open` it with `Client.connect`."""

    def __init__(self, connection: ClientConnection) -> None:
        self.ws = connection
        self.events: list[Event] = []
        self.welcome: Event | None = None
        self.pongs: list[Event] = []

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        hello: Event | None = None,
        headers: dict[str, str] | None = None,
        origin: str | None = None,
        rcvbuf: int | None = None,
        max_queue: int = 16,
        subprotocols: list[str] | None = None,
        ping_interval: float | None = 20,
    ) -> Client:
        sock = None
        if rcvbuf is not None:
            host, port = url.split("//", 1)[1].split("/", 1)[0].split(":")
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.connect((host, int(port)))
            sock.setblocking(False)
        connection = await connect(
            url,
            additional_headers=headers,
            origin=origin,  # type: ignore[arg-type]
            subprotocols=[Subprotocol(name) for name in subprotocols or ["sluice.v1"]],
            max_queue=max_queue,
            max_size=None,
            compression=None,
            open_timeout=10,
            ping_interval=ping_interval,
            sock=sock,
        )
        client = cls(connection)
        if hello is not None:
            await client.send({"type": "hello", "protocol": 1} | hello)
        return client

    @property
    def last_seq(self) -> int:
        seqs = [e["seq"] for e in self.events if "seq" in e]
        return seqs[-1] if seqs else 0

    async def send(self, message: Event | str | bytes) -> None:
        if isinstance(message, dict):
            await self.ws.send(orjson.dumps(message).decode())
        else:
            await self.ws.send(message)

    async def recv(self, within: float = 10.0) -> Event:
        """The next event (welcome and pongs are kept aside, and returned too)."""
        raw = await asyncio.wait_for(self.ws.recv(), within)
        event: Event = orjson.loads(raw)
        if event["type"] == "welcome":
            assert self.welcome is None, "a second welcome on one connection"
            self.welcome = event
        elif event["type"] == "pong":
            self.pongs.append(event)
        else:
            self.events.append(event)
        return event

    async def until(self, done: Callable[[list[Event]], bool], within: float = 20.0) -> list[Event]:
        async with asyncio.timeout(within):
            while not done(self.events):
                await self.recv(within)
        return self.events

    async def until_terminal(self, *ids: str, within: float = 20.0) -> list[Event]:
        return await self.until(lambda ev: all(terminal_of(ev, i) is not None for i in ids), within)

    async def until_closed(self, within: float = 20.0) -> int | None:
        """Read everything left until the server closes; the close code."""
        try:
            async with asyncio.timeout(within):
                while True:
                    await self.recv(within)
        except ConnectionClosed:
            pass
        return close_code(self.ws)

    def kill(self) -> None:
        """Drop the TCP connection at once: no close frame, like a network failure."""
        self.ws.transport.abort()

    async def close(self) -> None:
        await self.ws.close()
