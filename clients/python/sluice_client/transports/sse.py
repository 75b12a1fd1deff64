"""The SSE fallback transport: ``POST /v1/sessions``, ``GET .../events``, ``POST .../messages``.

For networks where a WebSocket cannot be opened. The ``welcome`` is the answer to the session POST;
server messages arrive on one long ``text/event-stream`` GET (resumed with ``Last-Event-ID``);
client messages go out one POST at a time, in order (a ``cancel`` must never overtake the request
it cancels). Every httpx exception and HTTP status becomes a `TransportClosed` or a `SluiceError`
in `_failure` and `_refusal`, the two places that know them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any, Final

import httpx
import orjson

from protocol.errors import ErrorCode, SluiceError
from protocol.messages import Hello, Welcome
from sluice_client.errors import TransportClosed, closed_with, connection_failed, from_status
from sluice_client.eventstream import EventStreamParser
from sluice_client.transports.base import TransportKind
from sluice_client.wire import ClientMessage, ServerEvent, WireError, decode, decode_object, encode

__all__ = ["SseTransport", "open_sse"]

_JSON: Final = {"Content-Type": "application/json"}
# The server writes a comment every 15 s; a stream silent for this long is dead (a laptop slept).
READ_TIMEOUT_S: Final = 45.0


class SseTransport:
    kind: TransportKind = "sse"

    def __init__(self, http: httpx.AsyncClient, base: str, welcome: Welcome, stream: httpx.Response) -> None:
        self._http = http
        self._base = base
        self._stream = stream
        self._send_lock = asyncio.Lock()
        self.welcome = welcome
        self.url = f"{base}/v1/sessions/{welcome.session}/events"

    async def send(self, message: ClientMessage) -> None:
        url = f"{self._base}/v1/sessions/{self.welcome.session}/messages"
        async with self._send_lock:
            try:
                response = await self._http.post(url, content=encode(message), headers=_JSON)
            except httpx.HTTPError as exc:
                raise _failure(exc) from None
        if response.status_code < 300:
            return
        raise _refusal(response)

    async def events(self) -> AsyncGenerator[ServerEvent, None]:
        parser = EventStreamParser()
        try:
            async for chunk in self._stream.aiter_bytes():
                for event in parser.feed(chunk):
                    if event.event == "close":
                        raise _close_event(event.data)
                    try:
                        yield decode(event.data)
                    except WireError as exc:
                        error = SluiceError(ErrorCode.UPSTREAM_ERROR, str(exc), retryable=False)
                        raise TransportClosed(error, fatal=True) from None
        except (httpx.HTTPError, httpx.StreamError) as exc:
            raise _failure(exc) from None
        finally:
            await self._stream.aclose()
        raise TransportClosed(connection_failed("the event stream ended"))

    async def close(self, *, end_session: bool = False) -> None:
        await self._stream.aclose()
        if end_session:
            try:
                await self._http.delete(f"{self._base}/v1/sessions/{self.welcome.session}")
            except httpx.HTTPError:
                pass  # the session then simply expires on the server


async def open_sse(http: httpx.AsyncClient, base: str, hello: Hello) -> SseTransport:
    """Create or resume the session, then open its event stream after what the client has."""
    try:
        response = await http.post(f"{base}/v1/sessions", content=encode(hello), headers=_JSON)
    except httpx.HTTPError as exc:
        raise _failure(exc) from None
    if response.status_code >= 300:
        raise _opening_refused(response)
    raw = _json(response)
    if isinstance(raw, dict):
        raw.setdefault("type", "welcome")
    try:
        welcome = decode_object(raw)
    except WireError as exc:
        raise TransportClosed(
            SluiceError(ErrorCode.UPSTREAM_ERROR, str(exc), retryable=False), fatal=True
        ) from None
    if not isinstance(welcome, Welcome):
        error = SluiceError(ErrorCode.UPSTREAM_ERROR, "POST /v1/sessions did not answer with a welcome")
        raise TransportClosed(error, fatal=True)
    headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
    if welcome.resumed and hello.last_seq:
        headers["Last-Event-ID"] = str(hello.last_seq)
    timeout = httpx.Timeout(10.0, read=READ_TIMEOUT_S)
    request = http.build_request(
        "GET", f"{base}/v1/sessions/{welcome.session}/events", headers=headers, timeout=timeout
    )
    try:
        stream = await http.send(request, stream=True)
    except httpx.HTTPError as exc:
        raise _failure(exc) from None
    if stream.status_code >= 300:
        await stream.aread()
        await stream.aclose()
        raise _opening_refused(stream)
    return SseTransport(http, base, welcome, stream)


def _close_event(data: str) -> TransportClosed:
    """The server ended the stream as it would close a WebSocket: ``{code, reason}``."""
    try:
        raw = orjson.loads(data)
    except orjson.JSONDecodeError:
        raw = None
    code = raw.get("code") if isinstance(raw, dict) else None
    reason = raw.get("reason") if isinstance(raw, dict) else None
    return closed_with(code if isinstance(code, int) else None, reason if isinstance(reason, str) else "")


def _json(response: httpx.Response) -> Any:
    try:
        return orjson.loads(response.content) if response.content else None
    except orjson.JSONDecodeError:
        return None


def _opening_refused(response: httpx.Response) -> TransportClosed:
    status = response.status_code
    error = from_status(status, _json(response), retry_after_s=response.headers.get("Retry-After"))
    return TransportClosed(error, fatal=status in (401, 403))


def _refusal(response: httpx.Response) -> Exception:
    """A POST of one message was not accepted: the message is refused, or the session is gone."""
    status = response.status_code
    error = from_status(status, _json(response), retry_after_s=response.headers.get("Retry-After"))
    if status == 404 or status >= 500:
        # The session expired (or the server failed): reconnecting opens or resumes one.
        return TransportClosed(error)
    if status == 401:
        return TransportClosed(error, fatal=True)
    return error


def _failure(exc: httpx.HTTPError | httpx.StreamError) -> TransportClosed:
    if isinstance(exc, httpx.TimeoutException):
        return TransportClosed(connection_failed("the server stopped answering"))
    return TransportClosed(connection_failed(type(exc).__name__))
