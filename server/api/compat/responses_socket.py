"""The Responses API's WebSocket mode: ``GET /v1/responses`` with Upgrade, as the ``openai`` SDK's
``client.responses.connect()`` opens it.

One socket carries any number of responses. The client sends JSON text frames: ``response.create``
holds the fields of ``POST /v1/responses`` (parsed and refused exactly as there, by
`server.api.compat.responses.parse_body`) and ``stream_id``, its lane; the server sends each
response's events, the objects of the SSE stream's ``data``, one per text frame, each carrying its
lane's ``stream_id`` (none on the default lane, the one without a ``stream_id``). Over a socket
a response is always streamed: ``stream: false``, ``background: true`` and ``generate: false``
(warmup) are refused naming them.

Lanes: the creates of one lane run one after another (FIFO, never overlapping), different lanes
run concurrently, at most `MAX_ACTIVE` responses at once per socket (the others wait their turn in
their lanes), with at most `MAX_LANES` named lanes per socket and `MAX_QUEUED` creates waiting per
lane. A refused create gets an ``error`` event in its lane's order; a frame that is not a JSON
object, a bad ``stream_id`` or a full lane get one at once; an event type this server does not
take (``response.inject``, anything unknown) gets an ``error`` naming it, and
``response.steer`` gets the SDK's ``response.steer.failed`` (``steering_not_supported``). The
socket stays usable after each of them.

Admission is `server.admission.admit`, as for sluice's own sockets: the drain state, the
``Origin``, and an ``Authorization: Bearer`` header (or ``?ticket=``); a refusal is the
handshake's HTTP answer in OpenAI's error shape (401, 403, 503), as OpenAI answers it. Every
response then goes through `server.api.compat.responses_run.start_run`, the one pipeline of
``POST /v1/responses``, so per-key rate limits, the token budget, the metrics and the response
store apply as for ``POST``.

Bounds: writes await the socket (uvicorn's flow control), so a slow reader holds back the lanes
instead of growing a queue here; each response keeps its own, bounded event log meanwhile. A write
stuck for ``outbound_stall_s`` closes the socket 4008 (a watchdog timer while writing, not one per
frame: writing is the hot path, once per token). When the socket closes, every response it
started that has not ended is cancelled (stored as ``cancelled`` with its text so far) and the
creates still waiting are dropped.

A response with ``store: false`` is kept nowhere but in this socket's own cache (the last
`MAX_CACHED`): a later ``response.create`` on the same socket, in any lane, may continue it by
``previous_response_id``, as OpenAI's connection-local cache allows; another socket cannot.

Drain (SIGTERM): the socket is drained with the sessions (`server.shutdown.Drainer`). A
``response.create`` from then on gets an ``error`` event (``shutting_down``, 503, retryable); the
responses running get the drain timeout to end; those still running then end ``failed`` (stored
so, with their text so far, their ``response.failed`` sent in their lane); then the socket closes
1012, on which the SDK reconnects.

Reconnection: after a recoverable close (1001, 1006, 1011, 1012, 1013), the SDK (given
``on_reconnecting``) opens a new socket and sends there the events it queued meanwhile; it
replays nothing and asks for nothing. What carries over is what is stored: a completed response
(``store``, the default) stays retrievable with ``GET /v1/responses/{id}`` and continues with
``previous_response_id`` from any socket of its key.

This module never produces a response itself, never reads a request body over HTTP, and never lets
one lane's events or errors reach another lane.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections import OrderedDict, deque
from typing import Any, Final

import orjson
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect

from protocol.close import CloseCode
from protocol.errors import ErrorCode, SluiceError
from server.admission import admit
from server.api.compat.openai_chat import refuse
from server.api.compat.responses import parse_body, runs_of
from server.api.compat.responses_model import ResponsesRequest
from server.api.compat.responses_run import ResponseRun, start_run
from server.api.compat.responses_store import StoredResponse
from server.api.errors import Family, FieldError, error_body, error_response, status_for
from server.services import Services, services_of

__all__ = ["MAX_ACTIVE", "MAX_CACHED", "MAX_LANES", "MAX_QUEUED", "ResponsesSocket", "responses_socket"]

log = logging.getLogger("sluice.responses_ws")

MAX_LANES: Final = 32  # named lanes per socket (OpenAI's limit); the default lane is extra
MAX_QUEUED: Final = 16  # creates waiting in one lane
MAX_ACTIVE: Final = 16  # responses running at once on one socket (OpenAI's limit)
MAX_CACHED: Final = 64  # unstored responses a later create on this socket may continue from
TRANSPORT: Final = "responses_ws"  # the metrics' transport label
# What the SDK's lanes accept as a stream_id.
_STREAM_ID: Final = re.compile(r"[A-Za-z0-9_.-]{1,256}")
# At least this long to get a close frame past a peer that reads slowly.
_MIN_CLOSE_WAIT_S: Final = 5.0

Event = dict[str, Any]


class ResponsesSocket:
    """The ASGI app of ``GET /v1/responses`` (Upgrade), mounted as a plain `WebSocketRoute`
    beside the HTTP routes of the same path (an open socket keeps no FastAPI layers alive)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        websocket = WebSocket(scope, receive, send)
        await _Connection(websocket, services_of(websocket), send).serve()


responses_socket = ResponsesSocket()


class _Gone(Exception):
    """The socket can take no more frames (the peer left, or it was closed as too slow)."""


class _Lane:
    """One ``stream_id``: its waiting creates and the task working through them."""

    __slots__ = ("pending", "stream_id", "tail", "task")

    def __init__(self, stream_id: str | None) -> None:
        self.stream_id = stream_id
        self.pending: deque[Event] = deque()
        self.task: asyncio.Task[None] | None = None
        # Every event of this lane ends with it: its stream_id, encoded once.
        self.tail = b"}" if stream_id is None else b',"stream_id":' + orjson.dumps(stream_id) + b"}"


class _Connection:
    """One socket, from handshake to close."""

    def __init__(self, websocket: WebSocket, services: Services, send: Send) -> None:
        self._ws = websocket
        self._send = send  # the ASGI send, for data frames
        self._services = services
        self._stall_s = services.settings.outbound_stall_s
        self._key_id = ""
        self._lanes: dict[str | None, _Lane] = {}
        self._active = asyncio.Semaphore(MAX_ACTIVE)
        self._writing = asyncio.Lock()
        self._runs: dict[str, tuple[ResponseRun, str | None]] = {}  # started here, not yet ended
        # This socket's unstored responses (store: false), newest last: its connection-local cache.
        self._cache: OrderedDict[str, StoredResponse] = OrderedDict()
        self._notices = 0  # sequence numbers of the events that belong to no response
        self._reader: asyncio.Task[Any] | None = None
        self._loop = asyncio.get_running_loop()
        self._send_started: float | None = None  # when the write under way began
        self._stall_timer: asyncio.TimerHandle | None = None
        self._ending = False
        self._close_code: CloseCode | None = None
        self._closed = False  # the socket is closed (what the drain waits for)
        self._finishing: asyncio.Task[None] | None = None  # the drain's close, once it began

    async def serve(self) -> None:
        ws, services = self._ws, self._services
        try:
            self._key_id = admit(ws, services).key_for(session=None)
        except SluiceError as exc:
            await ws.send_denial_response(error_response(Family.OPENAI, exc))
            return
        await ws.accept()
        services.metrics.connection_opened(TRANSPORT)
        services.drainer.watch(self)
        try:
            await self._serve()
        finally:
            self._closed = True
            services.drainer.unwatch(self)

    async def _serve(self) -> None:
        self._reader = reader = asyncio.current_task()
        try:
            await self._read_loop()
        except asyncio.CancelledError:
            if not self._ending or (reader is not None and reader.uncancel() > 0):
                raise  # cancelled from outside (server shutdown): not ours to swallow
        except Exception:
            log.exception("responses socket failed")
            self._close_code = CloseCode.INTERNAL
        finally:
            self._ending = True
            await self._end()
            self._services.metrics.connection_closed(TRANSPORT)
        if self._close_code is not None:
            await self._close(self._close_code)

    # -- frames in ---------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        while True:
            message = await self._ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            try:
                if text is None:
                    raise SluiceError(
                        ErrorCode.INVALID_MESSAGE, "binary frames are not supported: send JSON text"
                    )
                event = _decode(text)
                await self._take(event)
            except SluiceError as exc:
                await self._error(exc, None)

    async def _take(self, event: Event) -> None:
        kind = event["type"]
        if kind == "response.create":
            self._queue(event)
        elif kind == "response.steer":
            await self._steer_failed(event)
        elif kind == "response.inject":
            raise FieldError(
                "type",
                ErrorCode.UNKNOWN_TYPE,
                "response.inject is not supported: no response here waits for input",
            )
        else:
            raise FieldError(
                "type", ErrorCode.UNKNOWN_TYPE, f"unknown client event {kind[:64]!r}; send response.create"
            )

    def _queue(self, event: Event) -> None:
        stream_id = event.get("stream_id")
        if stream_id is not None and (not isinstance(stream_id, str) or not _STREAM_ID.fullmatch(stream_id)):
            raise refuse("stream_id", "must be 1-256 ASCII letters, digits, underscores, hyphens or periods")
        lane = self._lanes.get(stream_id)
        if lane is None:
            if stream_id is not None and len(self._lanes) - (None in self._lanes) >= MAX_LANES:
                raise _LaneError(stream_id, f"at most {MAX_LANES} named lanes (stream_id) per socket")
            lane = self._lanes[stream_id] = _Lane(stream_id)
        if len(lane.pending) >= MAX_QUEUED:
            raise _LaneError(stream_id, f"at most {MAX_QUEUED} response.create may wait in one lane")
        lane.pending.append(event)
        if lane.task is None:
            lane.task = asyncio.create_task(self._work(lane))

    # -- lanes -------------------------------------------------------------------------------

    async def _work(self, lane: _Lane) -> None:
        try:
            while lane.pending:
                event = lane.pending.popleft()
                async with self._active:
                    await self._respond(lane, event)
        except _Gone:
            lane.pending.clear()
        except Exception:
            log.exception("responses socket lane failed")
            self._fail(CloseCode.INTERNAL)
        finally:
            lane.task = None

    async def _respond(self, lane: _Lane, event: Event) -> None:
        try:
            body = _request(event)
            run = await start_run(self._services, runs_of(self._ws), self._key_id, body, local=self._cache)
        except SluiceError as exc:
            await self._error(exc, lane.stream_id)
            return
        self._runs[run.id] = (run, lane.stream_id)
        tail = lane.tail
        async for batch in run.batches():
            await self._write(*(orjson.dumps(item)[:-1] + tail for item in batch))
        del self._runs[run.id]  # ended (a socket that closes first cancels it in _end)
        if not body.store and run.view["status"] in ("completed", "incomplete"):
            self._cache[run.id] = run.stored()
            while len(self._cache) > MAX_CACHED:
                self._cache.popitem(last=False)

    # -- frames out --------------------------------------------------------------------------

    async def _write(self, *frames: bytes) -> None:
        """Send ``frames``, one message each, after what other lanes are sending."""
        async with self._writing:
            if self._ending:
                raise _Gone
            if self._stall_timer is None:
                self._stall_timer = self._loop.call_later(self._stall_s, self._check_stall)
            try:
                for frame in frames:
                    self._send_started = self._loop.time()
                    await self._send({"type": "websocket.send", "text": frame.decode()})
            except (OSError, RuntimeError, WebSocketDisconnect):
                self._fail(None)
                raise _Gone from None
            finally:
                self._send_started = None

    def _check_stall(self) -> None:
        """The stall watchdog: one timer per ``outbound_stall_s`` while writing, none while idle.
        A write stuck that long closes the socket 4008 (`_end` then cancels the write)."""
        self._stall_timer = None
        started = self._send_started
        if started is None or self._ending:
            return
        stuck_for = self._loop.time() - started
        if stuck_for >= self._stall_s:
            self._services.metrics.outbound_close_slow()
            self._fail(CloseCode.SLOW_CONSUMER)
        else:
            self._stall_timer = self._loop.call_later(self._stall_s - stuck_for, self._check_stall)

    async def _error(self, error: SluiceError, stream_id: str | None) -> None:
        """``error`` as the SDK's ``error`` event, in ``stream_id``'s lane."""
        if isinstance(error, _LaneError):
            stream_id = error.stream_id
        status = status_for(error)
        field = error.field if isinstance(error, FieldError) else None
        event: Event = {
            "type": "error",
            "status": status,
            **error_body(Family.OPENAI, error, status=status, field=field),
        }
        if stream_id is not None:
            event["stream_id"] = stream_id
        with contextlib.suppress(_Gone):
            await self._write(orjson.dumps(event))

    async def _steer_failed(self, event: Event) -> None:
        target = event.get("previous_response_id")
        event_out: Event = {
            "type": "response.steer.failed",
            "sequence_number": self._notices,
            "error": {
                "type": "invalid_request_error",
                "code": "steering_not_supported",
                "message": "steering is not supported: send response.create with previous_response_id",
            },
            "steer": {"input": event.get("input"), "previous_response_id": target},
        }
        self._notices += 1
        running = self._runs.get(target) if isinstance(target, str) else None
        if running is not None and running[1] is not None:
            event_out["stream_id"] = running[1]
        with contextlib.suppress(_Gone):
            await self._write(orjson.dumps(event_out))

    # -- as the drain sees it (`server.seam.Drainable`) ---------------------------------------

    @property
    def busy(self) -> bool:
        return any(not run.done for run, _ in self._runs.values())

    @property
    def attached(self) -> bool:
        return not self._closed

    def goaway(self, reason: str, retry_after_ms: int) -> None:
        """Nothing to send: the SDK has no such event (new creates are refused while draining)."""

    def fail_all(self, error: SluiceError) -> None:
        """End this socket's running responses ``failed`` with ``error``; their lanes send it."""
        for run, _ in self._runs.values():
            run.stop(error)

    def finish_connection(self, code: CloseCode, reason: str) -> None:
        """Close with ``code`` once the lanes have sent what their responses ended with."""
        if self._finishing is None and not self._ending:
            self._finishing = asyncio.create_task(self._finish(code), name="sluice responses socket drain")

    async def _finish(self, code: CloseCode) -> None:
        lanes = [lane.task for lane in self._lanes.values() if lane.task is not None]
        if lanes:
            await asyncio.wait(lanes, timeout=_MIN_CLOSE_WAIT_S)
        self._fail(code)

    # -- the end -----------------------------------------------------------------------------

    def _fail(self, code: CloseCode | None) -> None:
        """Stop taking frames; close with ``code`` (None: the peer is gone already)."""
        if self._ending:
            return
        self._ending = True
        self._close_code = code
        if self._reader is not None:
            self._reader.cancel()

    async def _end(self) -> None:
        """Drop the waiting creates and cancel the responses still running."""
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        tasks = [lane.task for lane in self._lanes.values() if lane.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        runs = [run for run, _ in self._runs.values() if not run.done]
        self._runs.clear()
        ended = await asyncio.gather(*(run.cancel() for run in runs), return_exceptions=True)
        for run, outcome in zip(runs, ended, strict=True):
            if isinstance(outcome, Exception):
                log.error("cancelling a response failed", exc_info=outcome, extra={"response": run.id})

    async def _close(self, code: CloseCode) -> None:
        wait = max(self._stall_s, _MIN_CLOSE_WAIT_S)
        with contextlib.suppress(WebSocketDisconnect, OSError, RuntimeError, TimeoutError):
            async with asyncio.timeout(wait):
                await self._ws.close(code=int(code))


class _LaneError(SluiceError):
    """A create its lane cannot take (too many lanes, too many waiting): answered in that lane."""

    def __init__(self, stream_id: str | None, message: str) -> None:
        super().__init__(ErrorCode.TOO_MANY_INFLIGHT, message)
        self.stream_id = stream_id


def _decode(text: str) -> Event:
    try:
        event = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise SluiceError(ErrorCode.INVALID_MESSAGE, "the frame is not valid JSON") from None
    if not isinstance(event, dict):
        raise SluiceError(ErrorCode.INVALID_MESSAGE, "a client event must be a JSON object")
    if not isinstance(event.get("type"), str):
        raise FieldError("type", ErrorCode.INVALID_MESSAGE, "a client event needs a string type")
    return event


def _request(event: Event) -> ResponsesRequest:
    """The ``POST /v1/responses`` body a ``response.create`` holds (raises `FieldError`)."""
    fields = {name: value for name, value in event.items() if name not in ("type", "stream_id")}
    if fields.pop("stream", None) not in (None, True):
        raise refuse("stream", "a response over a WebSocket is always streamed; omit stream")
    if fields.get("background"):
        raise refuse("background", "background responses are not supported over a WebSocket; use POST")
    if fields.pop("generate", None) not in (None, True):
        raise refuse("generate", "warmup (generate: false) is not supported")
    return parse_body({**fields, "stream": True})
