"""The SSE session transport (PROTOCOL.md §3): the WebSocket's session over an event stream + POSTs.

For browsers and proxies where a WebSocket fails. The session is the very same one the WebSocket
uses (`server.sessions.SessionRegistry`, `server.runtime.SessionRuntime`): same event log, same
``seq``, same dispatcher, so a session moves WS → SSE → WS without losing or repeating an event.

- ``POST /v1/sessions`` — body like ``hello`` (all optional) → 201 with the ``welcome``. It
  resumes the named session when its log still holds every event after ``last_seq``, and opens
  a new one otherwise (``resumed: false``: never a partial recovery). It attaches nothing.
- ``GET /v1/sessions/{id}/events`` — attaches the stream as the session's live transport (taking
  over from a WebSocket, closed 4009, or an older stream) and sends every logged event after
  ``Last-Event-ID`` (header; else the ``last_event_id`` query; else 0, everything logged), then
  live ones: ``id: <seq>``, ``event: <type>``, ``data: <json>``. When those events are no longer
  all in the log the answer is 410 (404 for an unknown or expired session) and nothing is sent:
  the client opens a new session with ``POST /v1/sessions`` and knows its requests in flight were
  lost. A non-200 answer also stops an ``EventSource`` from reconnecting by itself.
- ``POST /v1/sessions/{id}/messages`` — one client message or a JSON array of them, decoded by the
  same codec as WebSocket frames. A body that does not decode is refused whole with a typed 4xx
  and nothing is handled. Otherwise every message is handled in order, exactly as if it had come
  over the WebSocket: refusals (``duplicate_id``, ``too_many_inflight``, ``rate_limited``) are
  numbered ``error`` events on the stream. The answer is 202 ``{accepted: [ids], refused: [...]}``;
  a single message that was refused is answered with its typed error and status instead.
- ``DELETE /v1/sessions/{id}`` — ends the session, cancelling what is in flight (204).

Besides logged events the stream carries, without ``id:`` (so ``Last-Event-ID`` never moves for
them): ``event: pong`` (the answer to a posted ``ping``) and, last, ``event: close`` with
``{code, reason}`` using the WebSocket close codes — 4009 (taken over: do not reconnect), 4008
(slow consumer), 1012 (drained after ``goaway``), 1001 (session ended). It opens with ``retry:``
and a comment every ``sse_keepalive_s`` keeps proxies open. A peer that stops reading is cut after
``outbound_stall_s`` (or past the outbox's hard bound) and can resume with ``Last-Event-ID``.

Auth: ``Authorization: Bearer`` or ``?ticket=`` (a ticket is single use: a browser gets a new one
for each reconnect), or ``token`` in the ``POST /v1/sessions`` body; the ``Origin`` is checked
(403). This module never runs a model and never numbers an event: the runtime and session do.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any, Final, Literal, assert_never

import orjson
from fastapi import Header, Path, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter
from sse_starlette import EventSourceResponse
from sse_starlette.sse import SendTimeoutError
from starlette.types import Receive, Scope, Send

from protocol.close import CloseCode
from protocol.codec import decode, encode, encode_delta
from protocol.errors import ErrorCode, SluiceError
from protocol.messages import (
    PROTOCOL_VERSION,
    Classification,
    ClientMessage,
    Delta,
    Done,
    Embedding,
    Error,
    Goaway,
    Pong,
    ToolCall,
    Welcome,
)
from protocol.session import Accepted, CancelRequested, Ignored, Refused, Reply
from protocol.sse import encode_event, encode_message
from server.admission import admit
from server.api.errors import Family, StatusError, error_response, json_response
from server.api.routing import api_router, error_model
from server.api.streams import SSE_HEADERS, EventStream, keepalive
from server.outbox import Frame, OutboundMessage, Outbox
from server.seam import SessionHandle
from server.services import Services, services_of
from server.sessions import NotAttached

__all__ = ["MAX_BATCH_MESSAGES", "router"]

log = logging.getLogger("sluice.sse")

# Messages in one POST body; a client with more sends more POSTs.
MAX_BATCH_MESSAGES: Final = 1024
# Frames already queued are written together, up to this many bytes per chunk: one send, one
# TCP segment train, instead of one per token when a stream runs fast.
_COALESCE_BYTES: Final = 64 * 1024

_ERRORS: Final[dict[int | str, dict[str, Any]]] = {
    status: {"model": error_model(Family.SLUICE)}
    for status in (400, 401, 403, 404, 409, 410, 413, 422, 429, 503)
}

# Bodies are JSON whatever their Content-Type says (`curl -d`): nothing here rides on cookies, and
# the Origin check refuses foreign pages, so a form-encoded cross-site POST gains nothing.
router = api_router(
    Family.SLUICE, authenticate=False, tags=["sessions (SSE)"], responses=_ERRORS, any_content_type=True
)


# ---------------------------------------------------------------------------------------------
# Models for the OpenAPI document and the request bodies.


class OpenSession(BaseModel):
    """The body of ``POST /v1/sessions``: the fields of ``hello``, all optional."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["hello"] | None = None
    protocol: int = PROTOCOL_VERSION
    session: str | None = Field(default=None, min_length=1, max_length=128)
    last_seq: int | None = Field(default=None, ge=0)
    token: str | None = Field(default=None, max_length=4096)
    client: str | None = Field(default=None, max_length=256)


class Refusal(BaseModel):
    ref: str | None = None
    seq: int
    code: ErrorCode
    message: str
    retryable: bool
    retry_after_ms: int | None = None


class Posted(BaseModel):
    """The answer to ``POST /v1/sessions/{id}/messages``."""

    accepted: list[str]
    refused: list[Refusal] = []


def _inline(schema: Any, defs: dict[str, Any]) -> Any:
    """``schema`` with every ``$ref`` replaced by its definition (the models are not recursive),
    so that it stands alone inside the OpenAPI document."""
    if isinstance(schema, dict):
        ref = schema.get("$ref")
        if isinstance(ref, str):
            return _inline(defs[ref.rsplit("/", 1)[-1]], defs)
        return {
            key: _inline(value, defs)
            for key, value in schema.items()
            if key not in ("$defs", "discriminator")
        }
    if isinstance(schema, list):
        return [_inline(item, defs) for item in schema]
    return schema


def _messages_body_schema() -> dict[str, Any]:
    one = TypeAdapter(ClientMessage).json_schema()
    message = _inline(one, one.get("$defs", {}))
    return {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "anyOf": [message, {"type": "array", "items": message, "maxItems": MAX_BATCH_MESSAGES}]
                }
            }
        },
    }


# ---------------------------------------------------------------------------------------------
# What every route needs.


def _key(
    request: Request, services: Services, *, session: str | None, opening: bool, token: str | None = None
) -> str:
    """The caller's ``key_id`` once `admit` passed (``opening``: refused while draining)."""
    return admit(request, services, opening=opening).key_for(session=session, token=token)


async def _runtime(services: Services, session: str, key_id: str) -> SessionHandle:
    runtime = await services.sessions.find(session, key_id)
    if runtime is None:
        raise _unknown_session()
    return runtime


def _unknown_session() -> StatusError:
    return StatusError(
        404, ErrorCode.INVALID_REQUEST, "unknown or expired session: open one with POST /v1/sessions"
    )


SessionId = Annotated[str, Path(min_length=1, max_length=128)]


# ---------------------------------------------------------------------------------------------
# POST /v1/sessions


@router.post("/v1/sessions", status_code=201, response_model=Welcome, summary="Open or resume a session")
async def open_session(request: Request, body: OpenSession | None = None) -> Response:
    services = services_of(request)
    hello = body if body is not None else OpenSession()
    key_id = _key(request, services, session=hello.session, opening=True, token=hello.token)
    if hello.protocol != PROTOCOL_VERSION:
        raise SluiceError(
            ErrorCode.UNSUPPORTED_PROTOCOL,
            f"protocol {hello.protocol} is not supported (this server speaks {PROTOCOL_VERSION})",
        )
    welcome = await services.sessions.open_or_resume(
        key_id=key_id, welcome=services.welcome, resume=hello.session, last_seq=hello.last_seq
    )
    return Response(encode(welcome), status_code=201, media_type="application/json")


# ---------------------------------------------------------------------------------------------
# GET /v1/sessions/{id}/events


def _frame(message: OutboundMessage) -> bytes:
    """How the outbox encodes for this transport: logged events with ``id:``/``event:``, ``pong``
    without ``id:``, and nothing for ``welcome`` (``POST /v1/sessions`` answered it)."""
    match message:
        case Delta() | ToolCall() | Done() | Embedding() | Classification() | Error() | Goaway():
            return encode_message(message)
        case Pong():
            return encode_event(encode(message), event="pong")
        case Welcome():
            return b""
        case _:
            assert_never(message)


def _delta_frame(request_id: str, seq: int, text: str) -> bytes:
    """`_frame` of ``Delta(id=request_id, seq=seq, text=text)``, from its fields (the runtime's
    path for every live token: no model)."""
    return encode_event(encode_delta(request_id, seq, text), id=seq, event="delta")


def _bytes(frame: Frame) -> bytes:
    return frame if isinstance(frame, bytes) else frame.encode()


def _close_event(code: CloseCode, reason: str) -> bytes:
    return encode_event(orjson.dumps({"code": int(code), "reason": reason}).decode(), event="close")


class _SessionStream:
    """One attached events stream: the outbox the runtime pushes into, drained into SSE chunks."""

    def __init__(self, services: Services) -> None:
        settings = services.settings
        self.runtime: SessionHandle | None = None
        self.outbox = Outbox(
            encode=_frame,
            encode_delta=_delta_frame,
            soft_bytes=settings.outbound_soft_bytes,
            hard_bytes=settings.outbound_hard_bytes,
            max_refs=settings.replay_events,
            hold_s=settings.delta_hold_s,
        )
        self._services = services
        self._retry = f"retry: {settings.sse_retry_ms}\n\n".encode()
        self._ended = False

    async def chunks(self) -> AsyncIterator[bytes]:
        outbox = self.outbox
        try:
            yield self._retry
            while (frame := await outbox.next_frame()) is not None:
                chunk = await self._coalesce(frame) if outbox.backlog else _bytes(frame)
                if chunk:
                    yield chunk
            if outbox.close_code is not None:
                yield _close_event(outbox.close_code, outbox.close_reason)
        finally:
            self.end()

    async def _coalesce(self, first: Frame) -> bytes:
        """``first`` and the frames queued behind it (the outbox hands them out without waiting)."""
        outbox = self.outbox
        parts = [_bytes(first)]
        size = len(parts[0])
        while size < _COALESCE_BYTES and outbox.backlog:
            frame = await outbox.next_frame()
            if frame is None:
                break
            parts.append(_bytes(frame))
            size += len(parts[-1])
        return b"".join(parts)

    def stalled(self) -> None:
        """A write took longer than ``outbound_stall_s``: the peer stopped reading."""
        self.outbox.fail(CloseCode.SLOW_CONSUMER, "client stopped reading")
        self._services.metrics.outbound_close_slow()
        log.info("closing a slow SSE consumer", extra={"session": self.runtime.id if self.runtime else None})

    def attached(self, runtime: SessionHandle) -> None:
        """The registry attached `outbox` to ``runtime``: the stream is live."""
        self.runtime = runtime
        self._services.metrics.connection_opened("sse")

    def end(self) -> None:
        """Detach from the session (idempotent); its events go on to its log."""
        if self._ended or self.runtime is None:
            return
        self._ended = True
        self.runtime.detach(self.outbox)
        if not self.outbox.closed:
            self.outbox.fail(CloseCode.GOING_AWAY, "event stream ended")
        self._services.metrics.connection_closed("sse")


class _EventStreamResponse(EventStream):
    """sse-starlette's response, ending the stream's attachment however the response ends
    (disconnect, stall, a disconnect before the first chunk) and quietly for a stall."""

    def __init__(self, stream: _SessionStream, services: Services) -> None:
        settings = services.settings
        super().__init__(
            stream.chunks(),
            headers=SSE_HEADERS,
            ping=settings.sse_keepalive_s,
            ping_message_factory=keepalive,
            sep="\n",
            stall_s=settings.outbound_stall_s,
            # On SIGTERM the drain ends the stream itself (goaway, then close 1012).
            shutdown_grace_period=settings.drain_timeout_s + 5.0,
        )
        self._stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except SendTimeoutError:
            self._stream.stalled()
        finally:
            self._stream.end()


def _resume_point(header: int | None, query: int | None) -> int:
    # The header wins: an EventSource reconnecting by itself sends the newest id there, while
    # the URL still carries the query it was first opened with.
    if header is not None:
        return header
    return query if query is not None else 0


@router.get(
    "/v1/sessions/{session}/events",
    response_class=EventSourceResponse,
    responses={
        200: {
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
            "description": "`id: <seq>`, `event: <type>`, `data: <json>` per logged event (PROTOCOL.md §3).",
        }
    },
    summary="The session's event stream (replay after Last-Event-ID, then live)",
)
async def session_events(
    request: Request,
    session: SessionId,
    last_event_id: Annotated[int | None, Query(ge=0, le=2**53)] = None,
    last_event_id_header: Annotated[int | None, Header(alias="last-event-id", ge=0, le=2**53)] = None,
) -> Response:
    services = services_of(request)
    key_id = _key(request, services, session=session, opening=True)
    last_seq = _resume_point(last_event_id_header, last_event_id)
    stream = _SessionStream(services)
    match await services.sessions.attach(stream.outbox, session_id=session, key_id=key_id, last_seq=last_seq):
        case NotAttached.UNKNOWN:
            raise _unknown_session()
        case NotAttached.INCOMPLETE:
            raise StatusError(
                410,
                ErrorCode.INVALID_REQUEST,
                f"the events after {last_seq} are no longer all held: open a new session with POST /v1/sessions",
            )
        case runtime:
            stream.attached(runtime)
    return _EventStreamResponse(stream, services)


# ---------------------------------------------------------------------------------------------
# POST /v1/sessions/{id}/messages


async def _read_body(request: Request, limit: int) -> bytes:
    """The raw body, refused past ``limit`` bytes before more of it is read."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise SluiceError(ErrorCode.MESSAGE_TOO_LARGE, f"body exceeds {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise SluiceError(ErrorCode.MESSAGE_TOO_LARGE, f"body exceeds {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _decode_body(raw: bytes, max_bytes: int) -> tuple[list[ClientMessage], bool]:
    """Every message of the body, and whether it was a single one (not an array). Raises the
    `SluiceError` of the first that does not decode, naming its index."""
    if not raw.lstrip().startswith(b"["):
        return [decode(raw, max_bytes=max_bytes)], True
    try:
        items = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise SluiceError(ErrorCode.INVALID_MESSAGE, "body is not valid JSON") from None
    if not isinstance(items, list) or not items:
        raise SluiceError(ErrorCode.INVALID_MESSAGE, "body must be a message or a non-empty array of them")
    if len(items) > MAX_BATCH_MESSAGES:
        raise SluiceError(ErrorCode.INVALID_MESSAGE, f"at most {MAX_BATCH_MESSAGES} messages per body")
    messages: list[ClientMessage] = []
    for index, item in enumerate(items):
        try:
            try:
                # Re-encoded so each message meets the size limit on its own, as over the WebSocket.
                text = orjson.dumps(item)
            except orjson.JSONEncodeError:
                # orjson parses 1024 levels of nesting but writes only 255.
                raise SluiceError(ErrorCode.INVALID_MESSAGE, "message is nested too deeply") from None
            messages.append(decode(text, max_bytes=max_bytes))
        except SluiceError as exc:
            exc.message = f"message [{index}]: {exc.message}"
            raise
    return messages, False


@router.post(
    "/v1/sessions/{session}/messages",
    status_code=202,
    response_model=Posted,
    openapi_extra={"requestBody": _messages_body_schema()},
    summary="Send one client message or an array of them",
)
async def post_messages(request: Request, session: SessionId) -> Response:
    services = services_of(request)
    key_id = _key(request, services, session=session, opening=False)
    runtime = await _runtime(services, session, key_id)
    settings = services.settings
    raw = await _read_body(request, settings.max_frame_bytes)
    messages, single = _decode_body(raw, settings.max_message_bytes)
    accepted: list[str] = []
    refused: list[Error] = []
    for outcome in await runtime.handle_all(messages):
        match outcome:
            case Accepted(request=accepted_request):
                accepted.append(accepted_request.id)
            case Refused(event=event):
                refused.append(event)
            case CancelRequested() | Reply() | Ignored():
                pass
            case unreachable:
                assert_never(unreachable)
    if single and refused:
        event = refused[0]
        error = SluiceError(
            event.code,
            event.message,
            retryable=event.retryable,
            retry_after_ms=event.retry_after_ms,
            ref=event.ref,
        )
        return error_response(Family.SLUICE, error, extra={"seq": event.seq})
    body: dict[str, Any] = {"accepted": accepted, "refused": [_refusal_body(event) for event in refused]}
    return json_response(body, 202)


def _refusal_body(event: Error) -> dict[str, Any]:
    body: dict[str, Any] = {
        "ref": event.ref,
        "seq": event.seq,
        "code": event.code.value,
        "message": event.message,
        "retryable": event.retryable,
    }
    if event.retry_after_ms is not None:
        body["retry_after_ms"] = event.retry_after_ms
    return body


# ---------------------------------------------------------------------------------------------
# DELETE /v1/sessions/{id}


@router.delete(
    "/v1/sessions/{session}", status_code=204, summary="End a session, cancelling what is in flight"
)
async def end_session(request: Request, session: SessionId) -> Response:
    services = services_of(request)
    key_id = _key(request, services, session=session, opening=False)
    runtime = await _runtime(services, session, key_id)
    await services.sessions.end(runtime.id)
    return Response(status_code=204)
