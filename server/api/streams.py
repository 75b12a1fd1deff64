"""The two streaming HTTP responses of the plain APIs: server-sent events and NDJSON.

Both take an async iterator of ready-made bytes (each API module writes its own wire format) and
cancel it when the client disconnects: sse-starlette's `EventSourceResponse` watches for the
disconnect itself, and starlette's `StreamingResponse` does under uvicorn's HTTP protocols (ASGI
spec 2.3), so the iterator's ``finally``/``aclosing`` closes the upstream work at once.

Server-sent events here get what PROTOCOL.md asks of the session stream too: a keep-alive comment
every ``sse_keepalive_s``, ``Cache-Control: no-cache`` and ``X-Accel-Buffering: no``, and, on
SIGTERM, time to finish (up to ``drain_timeout_s``) before sse-starlette cancels the stream.
They have no per-send timeout, so each chunk is handed to the server's ``send`` as it is: sse-starlette
would open an anyio cancel scope around every send even without a deadline, which cost more CPU
than the rest of a relayed token's way through sluice (`EventStream`). Nothing here knows what the
bytes mean.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Final

from fastapi.responses import StreamingResponse
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.types import Message, Send

from server.settings import Settings

__all__ = ["NDJSON", "SSE_HEADERS", "EventStream", "event_stream", "keepalive", "ndjson_stream"]

NDJSON: Final = "application/x-ndjson"
SSE_HEADERS: Final[Mapping[str, str]] = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def keepalive() -> ServerSentEvent:
    """The comment sent while a stream is idle, so that proxies keep it open."""
    return ServerSentEvent(comment="keepalive", sep="\n")


class EventStream(EventSourceResponse):
    """sse-starlette's response; without a ``send_timeout`` a send is the server's send alone
    (a scope with no deadline can never cancel it, so nothing changes but its cost)."""

    async def _send_with_timeout(self, send: Send, message: Message) -> None:
        if self.send_timeout is None:
            await send(message)
        else:
            await super()._send_with_timeout(send, message)


def event_stream(
    body: AsyncIterator[bytes],
    settings: Settings,
    *,
    status_code: int = 200,
    headers: Mapping[str, str] | None = None,
) -> EventSourceResponse:
    """A ``text/event-stream`` response of ``body``'s chunks (already SSE-encoded)."""
    return EventStream(
        body,
        status_code=status_code,
        headers={**SSE_HEADERS, **(headers or {})},
        ping=settings.sse_keepalive_s,
        ping_message_factory=keepalive,
        sep="\n",
        shutdown_grace_period=settings.drain_timeout_s,
    )


def ndjson_stream(body: AsyncIterator[bytes]) -> StreamingResponse:
    """An ``application/x-ndjson`` response of ``body``'s chunks (one or more whole lines each)."""
    return StreamingResponse(body, media_type=NDJSON, headers={"X-Accel-Buffering": "no"})
