"""The interface every transport offers to `sluice_client.connection`.

A transport is opened already welcomed (its ``welcome`` attribute), carries client messages out
with `send` and server messages in with `events`, and ends by raising `TransportClosed` from
either. It must never retry, reorder, or drop a message on its own.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Literal, Protocol

from protocol.messages import Welcome
from sluice_client.wire import ClientMessage, ServerEvent

__all__ = ["Transport", "TransportKind"]

TransportKind = Literal["websocket", "sse"]


class Transport(Protocol):
    kind: TransportKind
    url: str
    welcome: Welcome

    async def send(self, message: ClientMessage) -> None:
        """Write one message. Raises `TransportClosed` when the transport is gone, and (SSE only) a
        `SluiceError` when the server refused this message outright."""
        ...

    def events(self) -> AsyncGenerator[ServerEvent, None]:
        """The server's messages after the welcome, in order; ends by raising `TransportClosed`."""
        ...

    async def close(self, *, end_session: bool = False) -> None:
        """Close politely; with ``end_session`` also ask the server to end the session."""
        ...
