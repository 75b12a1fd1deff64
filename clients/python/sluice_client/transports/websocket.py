"""The WebSocket transport (``GET /v1/ws``): one message per text frame, over the websockets library.

`open_websocket` does the HTTP upgrade and the ``hello`` → ``welcome`` handshake. Every exception
of the websockets library becomes a `TransportClosed` in `_handshake_failure` and `_closed`, the
two places that know close codes and handshake statuses. Keepalive pings are the library's: a
connection that stops answering (a laptop that slept) is closed and the connection reconnects.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Final

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.typing import Subprotocol

from protocol.errors import ErrorCode, SluiceError
from protocol.messages import Error, Hello, Welcome
from sluice_client.errors import TransportClosed, closed_with, connection_failed, from_status, from_wire
from sluice_client.transports.base import TransportKind
from sluice_client.wire import ClientMessage, ServerEvent, WireError, decode, encode

__all__ = ["WebSocketTransport", "open_websocket"]

SUBPROTOCOL: Final = Subprotocol("sluice.v1")
# Embedding results for a large batch are big frames; the server bounds what it sends.
MAX_FRAME_BYTES: Final = 64 * 1024 * 1024
PING_INTERVAL_S: Final = 20.0


class WebSocketTransport:
    kind: TransportKind = "websocket"

    def __init__(self, ws: ClientConnection, url: str, welcome: Welcome) -> None:
        self._ws = ws
        self.url = url
        self.welcome = welcome

    async def send(self, message: ClientMessage) -> None:
        try:
            await self._ws.send(encode(message))
        except ConnectionClosed:
            raise _closed(self._ws) from None

    async def events(self) -> AsyncGenerator[ServerEvent, None]:
        # recv() rather than `async for` over the connection: its iterator is a generator of the
        # library's that would be left for the garbage collector to close, after the loop is gone.
        while True:
            try:
                frame = await self._ws.recv()
            except ConnectionClosed:
                raise _closed(self._ws) from None
            yield _decode(frame)

    async def close(self, *, end_session: bool = False) -> None:
        # A WebSocket cannot end the session by itself; the caller cancels what is in flight first.
        await self._ws.close()


def _decode(frame: str | bytes) -> ServerEvent:
    try:
        return decode(frame)
    except WireError as exc:
        raise TransportClosed(
            SluiceError(ErrorCode.UPSTREAM_ERROR, str(exc), retryable=False), fatal=True
        ) from None


async def open_websocket(
    url: str, hello: Hello, *, token: str | None, open_timeout: float
) -> WebSocketTransport:
    """Connect, say ``hello``, and return the transport once the ``welcome`` is in."""
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        ws = await connect(
            url,
            additional_headers=headers,
            subprotocols=[SUBPROTOCOL],
            open_timeout=open_timeout,
            max_size=MAX_FRAME_BYTES,
            ping_interval=PING_INTERVAL_S,
            ping_timeout=PING_INTERVAL_S,
            close_timeout=2.0,
        )
    except (InvalidHandshake, OSError, TimeoutError) as exc:
        raise _handshake_failure(exc) from None
    try:
        await ws.send(encode(hello))
        first = _decode(await asyncio.wait_for(ws.recv(), open_timeout))
    except ConnectionClosed:
        raise _closed(ws) from None
    except TimeoutError:
        ws.transport.abort()
        raise TransportClosed(connection_failed("no welcome from the server"), fallback=True) from None
    except TransportClosed:
        ws.transport.abort()
        raise
    match first:
        case Welcome():
            return WebSocketTransport(ws, url, first)
        case Error():
            # The hello itself was refused (bad token, unsupported protocol): retrying cannot help.
            await ws.close()
            raise TransportClosed(from_wire(first), fatal=True)
        case _:
            ws.transport.abort()
            error = SluiceError(
                ErrorCode.UPSTREAM_ERROR, f"expected welcome, got {first.type}", retryable=False
            )
            raise TransportClosed(error, fatal=True)


def _handshake_failure(exc: Exception) -> TransportClosed:
    if isinstance(exc, InvalidStatus):
        response = exc.response
        try:
            body = orjson.loads(response.body) if response.body else None
        except orjson.JSONDecodeError:
            body = None
        status = response.status_code
        error = from_status(status, body, retry_after_s=response.headers.get("Retry-After"))
        # 401: the key is wrong everywhere. Anything else (404, 403 from a proxy, 426) may be a
        # network that blocks WebSockets: SSE can still work.
        return TransportClosed(error, fatal=status == 401, fallback=status != 401)
    if isinstance(exc, InvalidHandshake):
        return TransportClosed(connection_failed("the WebSocket handshake failed"), fallback=True)
    if isinstance(exc, TimeoutError):
        return TransportClosed(connection_failed("the WebSocket handshake timed out"), fallback=True)
    detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
    return TransportClosed(connection_failed(detail))


def _closed(ws: ClientConnection) -> TransportClosed:
    return closed_with(ws.close_code, ws.close_reason or "")
