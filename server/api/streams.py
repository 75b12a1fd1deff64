"""The two streaming HTTP responses of the plain APIs: server-sent events and NDJSON.

Both take an async iterator of ready-made bytes (each API module writes its own wire format) and
cancel it when the client disconnects: sse-starlette's `EventSourceResponse` watches for the
disconnect itself, and starlette's `StreamingResponse` does under uvicorn's HTTP protocols (ASGI
spec 2.3), so the iterator's ``finally``/``aclosing`` closes the upstream work at once.

Server-sent events here get what PROTOCOL.md asks of the session stream too: a keep-alive comment
every ``sse_keepalive_s``, ``Cache-Control: no-cache`` and ``X-Accel-Buffering: no``, and, on
SIGTERM, time to finish (up to ``drain_timeout_s``) before sse-starlette cancels the stream.
Each chunk is handed to the server's ``send`` as it is: sse-starlette would open an anyio cancel
scope around every send, even without a deadline, which cost more CPU than the rest of a relayed
token's way through sluice (`EventStream`). A stream that must cut a peer that stops reading (the
session transport's ``outbound_stall_s``) passes ``stall_s`` instead of sse-starlette's
``send_timeout``: a send blocked that long raises sse-starlette's ``SendTimeoutError`` all the
same, watched by one timer per stall period while sends are under way and none while idle.
Nothing here knows what the bytes mean.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any, Final

from fastapi.responses import StreamingResponse
from sse_starlette import EventSourceResponse, ServerSentEvent
from sse_starlette.sse import SendTimeoutError
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
    (a scope with no deadline can never cancel it, so nothing changes but its cost), bounded by
    ``stall_s`` when given (module docstring)."""

    def __init__(self, *args: Any, stall_s: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._stall_s = stall_s
        # The sends under way (the stream's and the keep-alive's), each with when it began, and
        # those the watchdog cancelled for blocking past `stall_s`.
        self._sending: dict[asyncio.Task[Any], float] = {}
        self._stalled: set[asyncio.Task[Any]] = set()
        self._watchdog: asyncio.TimerHandle | None = None

    async def _send_with_timeout(self, send: Send, message: Message) -> None:
        if self.send_timeout is not None:
            await super()._send_with_timeout(send, message)
            return
        if self._stall_s is None:
            await send(message)
            return
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        self._sending[task] = loop.time()
        if self._watchdog is None:
            self._watchdog = loop.call_later(self._stall_s, self._check_stall, loop)
        try:
            await send(message)
        except asyncio.CancelledError:
            if task not in self._stalled:
                raise
            self._stalled.discard(task)
            task.uncancel()
            raise SendTimeoutError() from None
        finally:
            del self._sending[task]

    def _check_stall(self, loop: asyncio.AbstractEventLoop) -> None:
        """Cancel every send blocked for `stall_s`; look again when the oldest other one would be."""
        self._watchdog = None
        limit = self._stall_s
        assert limit is not None
        now = loop.time()
        oldest: float | None = None
        for task, started in self._sending.items():
            if now - started >= limit:
                if task not in self._stalled:
                    self._stalled.add(task)
                    task.cancel()
            elif oldest is None or started < oldest:
                oldest = started
        if oldest is not None:
            self._watchdog = loop.call_later(oldest + limit - now, self._check_stall, loop)


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
