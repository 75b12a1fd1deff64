"""A sluice server for the Python client's tests: the real protocol state machine, fake backends.

Sessions are `protocol.session.Session` (the server's own seq, event log, replay and lifecycle),
so the fake numbers, replays and refuses exactly as the contract says; only the work is fake:
deterministic text at a chosen pace, deterministic vectors and scores. It serves the WebSocket
transport with the websockets library (so a test can kill a socket without a goodbye) and,
on request, the SSE transport with Starlette on uvicorn, both from one event loop on a background
thread, so sync-API tests that block their own thread still have a live server.

Fault knobs: ``kill_after_deltas`` (abort the next connection after N deltas), ``drop_requests``
/ ``kill_on_request`` (a request lost in transit / received just before the socket dies),
``close_after_deltas`` (a close code, as a WebSocket close frame or the SSE ``close`` event),
``forget()`` (drop every session: the next resume gets ``resumed: false``), ``goaway()``, models named
``error:<code>`` (every request fails with that code) and ``flaky:<code>`` (the first request
fails). With ``tools`` (and ``tool_choice`` not ``"none"``) a generation says a little, then calls
the named tool, or each listed tool (two at most), with `expected_arguments`, and ends with
``finish_reason: "tool_calls"``; a conversation ending in a ``tool`` turn gets text. With
``format`` the reply is `expected_json`, in three pieces. Test support only: it listens on 127.0.0.1 and must never be imported by the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import threading
import uuid
import zlib
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import orjson
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from protocol.codec import decode, encode
from protocol.errors import ErrorCode, SluiceError
from protocol.messages import (
    Classify,
    ClientMessage,
    Embed,
    FinishReason,
    Generate,
    Hello,
    LabelScore,
    Limits,
    LoggedMessage,
    Models,
    Pong,
    ServerInfo,
    Timings,
    Usage,
    Welcome,
)
from protocol.session import Accepted, CancelRequested, Ignored, Refused, Reply, Session, SessionLimits
from protocol.sse import encode_event, encode_message
from tests.client_python.fake_outputs import (
    calls_of,
    expected_arguments,
    expected_json,
    expected_text,
    expected_vector,
    pieces_of,
)

__all__ = ["FakeServer", "expected_arguments", "expected_json", "expected_text", "expected_vector"]

T = TypeVar("T")
GEN_MODEL, EMBED_MODEL, CLASSIFY_MODEL = "fake-gen", "fake-embed", "fake-classify"
MAX_MESSAGE_BYTES = 1 << 20


@dataclass
class _Conn:
    """One attached transport: events queue up here and one writer sends them in order."""

    queue: asyncio.Queue[LoggedMessage | Pong | None] = field(default_factory=asyncio.Queue)
    deltas_sent: int = 0

    def put(self, event: LoggedMessage | Pong | None) -> None:
        self.queue.put_nowait(event)


@dataclass
class _FakeSession:
    proto: Session
    conn: _Conn | None = None
    tasks: dict[str, asyncio.Task[None]] = field(default_factory=dict)

    def emit(self, event: LoggedMessage | None) -> None:
        # Already in the session's log (Session logs before returning); sent only if attached.
        if event is not None and self.conn is not None:
            self.conn.put(event)


class FakeServer:
    def __init__(
        self,
        *,
        tokens: int = 12,
        piece_delay_s: float = 0.005,
        embed_dims: int = 8,
        embed_delay_s: float = 0.01,
        replay_events: int = 4096,
        sse: bool = False,
        port: int = 0,
    ) -> None:
        self.tokens = tokens
        self.piece_delay_s = piece_delay_s
        self.embed_dims = embed_dims
        self.embed_delay_s = embed_delay_s
        self.replay_events = replay_events
        self.with_sse = sse
        self.kill_after_deltas: int | None = None
        self.forget_on_kill = False  # with a kill: the server "restarts" and forgets its sessions
        self.drop_requests = 0  # requests lost in transit: not seen, and the socket dies
        self.kill_on_request = 0  # requests accepted, then the socket dies before any event
        self.close_after_deltas: tuple[int, int] | None = None  # (n, close code)
        self.received: list[ClientMessage] = []
        self.hellos: list[Hello] = []
        self.ws_connections = 0
        self.sse_streams = 0
        self.embeds_in_flight = 0
        self.max_embeds_in_flight = 0
        self._sessions: dict[str, _FakeSession] = {}
        self._flaky_seen: set[str] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fake-sluice", daemon=True)
        self._ws_server: Server | None = None
        self._uvicorn: Any = None
        self._uvicorn_task: asyncio.Task[None] | None = None
        self.ws_port = port
        self.http_port = 0

    # -- lifecycle, from the test's thread ---------------------------------------------------

    def start(self) -> FakeServer:
        self._thread.start()
        self.call(self._start())
        return self

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        with contextlib.suppress(Exception):
            self.call(self._stop(), timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> FakeServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def call(self, coroutine: Coroutine[Any, Any, T], timeout: float = 10) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    @property
    def url(self) -> str:
        """The WebSocket server's base URL (``/v1/ws`` is appended by the client)."""
        return f"http://127.0.0.1:{self.ws_port}"

    @property
    def sse_url(self) -> str:
        """The Starlette server: SSE endpoints, and no WebSocket (an upgrade there gets 403)."""
        return f"http://127.0.0.1:{self.http_port}"

    def session_ids(self) -> list[str]:
        return list(self._sessions)

    def received_of(self, kind: type[Any]) -> list[Any]:
        return [message for message in list(self.received) if isinstance(message, kind)]

    def forget(self) -> None:
        """Drop every session, as a restarted server would."""
        self.call(self._forget())

    def goaway(self, retry_after_ms: int = 50) -> None:
        self.call(self._goaway(retry_after_ms))

    # -- the server, on its loop -------------------------------------------------------------

    async def _start(self) -> None:
        self._ws_server = await serve(self._ws_handler, "127.0.0.1", self.ws_port)
        self.ws_port = next(iter(self._ws_server.sockets)).getsockname()[1]
        if self.with_sse:
            await self._start_sse()

    async def _stop(self) -> None:
        for fs in self._sessions.values():
            for task in fs.tasks.values():
                task.cancel()
            if fs.conn is not None:
                fs.conn.put(None)
        if self._ws_server is not None:
            for connection in list(self._ws_server.connections):
                connection.transport.abort()
            self._ws_server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ws_server.wait_closed(), 5)
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
            self._uvicorn.force_exit = True
            if self._uvicorn_task is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._uvicorn_task, 5)
        others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    async def _forget(self) -> None:
        for fs in self._sessions.values():
            for task in fs.tasks.values():
                task.cancel()
        self._sessions.clear()

    async def _goaway(self, retry_after_ms: int) -> None:
        for fs in self._sessions.values():
            fs.emit(fs.proto.goaway("restarting", retry_after_ms))
            if fs.conn is not None:
                fs.conn.put(None)  # the writer closes the connection after what is queued

    def _welcome(self, fs: _FakeSession, resumed: bool) -> Welcome:
        return Welcome(
            session=fs.proto.id,
            resumed=resumed,
            last_seq=fs.proto.last_seq,
            server=ServerInfo(name="sluice", version="fake"),
            limits=Limits(
                max_message_bytes=MAX_MESSAGE_BYTES,
                max_inflight=64,
                replay_events=self.replay_events,
                session_ttl_s=120,
            ),
            models=Models(generate=[GEN_MODEL], embed=[EMBED_MODEL], classify=[CLASSIFY_MODEL]),
        )

    def _open(self, hello: Hello | None) -> tuple[_FakeSession, bool, int]:
        """The session a hello asks for: (session, resumed, seq to replay after)."""
        if hello is not None:
            self.hellos.append(hello)
            if hello.session is not None and hello.session in self._sessions:
                fs = self._sessions[hello.session]
                last_seq = hello.last_seq or 0
                if fs.proto.replay(last_seq) is not None:
                    return fs, True, last_seq
        session_id = uuid.uuid4().hex[:12]
        limits = SessionLimits(max_inflight=64, replay_events=self.replay_events)
        fs = self._sessions[session_id] = _FakeSession(Session(session_id, limits))
        return fs, False, 0

    def _attach(self, fs: _FakeSession, conn: _Conn, last_seq: int) -> None:
        # Replay and attach with no await between them, so no event falls in the gap.
        if fs.conn is not None and fs.conn is not conn:
            fs.conn.put(None)
        for event in fs.proto.replay(last_seq) or []:
            conn.put(event)
        fs.conn = conn

    def _detach(self, fs: _FakeSession, conn: _Conn) -> None:
        if fs.conn is conn:
            fs.conn = None

    def _handle(self, fs: _FakeSession, message: ClientMessage, conn: _Conn | None) -> SluiceError | None:
        """One client message; returns the refusal, if any (also logged and emitted)."""
        self.received.append(message)
        outcome = fs.proto.receive(message)
        match outcome:
            case Accepted(request=request):
                fs.tasks[request.id] = asyncio.create_task(self._work(fs, request))
            case CancelRequested(id=request_id):
                task = fs.tasks.get(request_id)
                if task is not None:
                    task.cancel()
            case Reply(message=pong):
                if conn is not None:
                    conn.put(pong)
            case Refused(event=event):
                fs.emit(event)
                return SluiceError(event.code, event.message, ref=event.ref)
            case Ignored():
                pass
        return None

    def _refuse(self, fs: _FakeSession, error: SluiceError) -> None:
        fs.emit(fs.proto.refuse(error))

    # -- fake work ---------------------------------------------------------------------------

    def _fault(self, model: str | None) -> SluiceError | None:
        if model is None or ":" not in model:
            return None
        kind, code = model.split(":", 1)
        if kind == "flaky":
            if model in self._flaky_seen:
                return None
            self._flaky_seen.add(model)
        error_code = ErrorCode(code)
        retry_after = 20 if error_code is ErrorCode.RATE_LIMITED else None
        return SluiceError(error_code, f"fake {code}", retry_after_ms=retry_after)

    async def _work(self, fs: _FakeSession, request: Generate | Embed | Classify) -> None:
        proto = fs.proto
        try:
            fault = self._fault(request.model)
            if fault is not None:
                await asyncio.sleep(0.005)
                fs.emit(proto.fail(request.id, fault))
                return
            proto.start(request.id)
            match request:
                case Generate():
                    await self._generate(fs, request)
                case Embed():
                    await self._embed(fs, request)
                case Classify():
                    await self._classify(fs, request)
        except asyncio.CancelledError:
            model = request.model or GEN_MODEL
            fs.emit(proto.cancelled(request.id, model=model))
        finally:
            fs.tasks.pop(request.id, None)

    async def _generate(self, fs: _FakeSession, request: Generate) -> None:
        turns = len(fs.proto.conversation(request)) if request.history else None
        material = (
            request.prompt
            if request.prompt is not None
            else "|".join(m.content for m in request.messages or [])
        )
        limit = request.options.max_tokens
        count = self.tokens if limit is None else min(limit, self.tokens)
        calls = calls_of(request)
        pieces = pieces_of(material, count, turns)
        if calls:
            pieces = pieces[:2]
        elif request.format is not None:
            text = expected_json(material)
            third = len(text) // 3
            pieces = [text[:third], text[third : 2 * third], text[2 * third :]]
        for piece in pieces:
            await asyncio.sleep(self.piece_delay_s)
            fs.emit(fs.proto.delta(request.id, piece))
        for number, name in enumerate(calls):
            await asyncio.sleep(self.piece_delay_s)
            call_id = f"call-{request.id}-{number}"
            arguments = expected_arguments(material, name)
            fs.emit(fs.proto.tool_call(request.id, call_id=call_id, name=name, arguments=arguments))
        if calls:
            finish_reason: FinishReason = "tool_calls"
        else:
            finish_reason = "length" if limit is not None and limit < self.tokens else "stop"
        fs.emit(
            fs.proto.done(
                request.id,
                finish_reason=finish_reason,
                usage=Usage(prompt_tokens=len(material.split()), completion_tokens=count),
                timings=Timings(
                    queue_ms=0.1,
                    ttft_ms=self.piece_delay_s * 1000,
                    total_ms=count * self.piece_delay_s * 1000,
                ),
                model=request.model or GEN_MODEL,
            )
        )

    async def _embed(self, fs: _FakeSession, request: Embed) -> None:
        self.embeds_in_flight += 1
        self.max_embeds_in_flight = max(self.max_embeds_in_flight, self.embeds_in_flight)
        try:
            await asyncio.sleep(self.embed_delay_s)
        finally:
            self.embeds_in_flight -= 1
        matrix = np.stack([expected_vector(text, self.embed_dims) for text in request.texts])
        if request.encoding == "base64":
            import base64

            rows: list[list[float]] | list[str] = [
                base64.b64encode(row.astype("<f4").tobytes()).decode() for row in matrix
            ]
        else:
            rows = matrix.tolist()
        fs.emit(
            fs.proto.embedding(
                request.id, model=request.model or EMBED_MODEL, dimensions=self.embed_dims, embeddings=rows
            )
        )

    async def _classify(self, fs: _FakeSession, request: Classify) -> None:
        await asyncio.sleep(0.002)
        results = []
        for text in request.texts:
            raw = [1.0 + (zlib.crc32(f"{text}|{label}".encode()) % 100) for label in request.labels]
            total = sum(raw)
            scores = [value / total if not request.multi_label else value / 101 for value in raw]
            row = [
                LabelScore(label=label, score=score)
                for label, score in zip(request.labels, scores, strict=True)
            ]
            results.append(sorted(row, key=lambda item: item.score, reverse=True))
        fs.emit(fs.proto.classification(request.id, model=request.model or CLASSIFY_MODEL, results=results))

    # -- WebSocket ---------------------------------------------------------------------------

    async def _ws_handler(self, ws: ServerConnection) -> None:
        self.ws_connections += 1
        conn = _Conn()
        try:
            first = decode(await ws.recv(), max_bytes=MAX_MESSAGE_BYTES)
        except (SluiceError, ConnectionClosed):
            return
        hello = first if isinstance(first, Hello) else None
        fs, resumed, last_seq = self._open(hello)
        await ws.send(encode(self._welcome(fs, resumed)))
        self._attach(fs, conn, last_seq)
        writer = asyncio.create_task(self._ws_writer(ws, conn))
        if hello is None:
            self._handle(fs, first, conn)
        try:
            async for frame in ws:
                try:
                    message = decode(frame, max_bytes=MAX_MESSAGE_BYTES)
                except SluiceError as error:
                    self._refuse(fs, error)
                    continue
                if isinstance(message, Generate | Embed | Classify) and self.drop_requests:
                    self.drop_requests -= 1
                    ws.transport.abort()
                    break
                self._handle(fs, message, conn)
                if isinstance(message, Generate | Embed | Classify) and self.kill_on_request:
                    self.kill_on_request -= 1
                    ws.transport.abort()
                    break
        except ConnectionClosed:
            pass
        finally:
            self._detach(fs, conn)
            writer.cancel()

    async def _ws_writer(self, ws: ServerConnection, conn: _Conn) -> None:
        while True:
            event = await conn.queue.get()
            if event is None:
                with contextlib.suppress(ConnectionClosed):
                    await ws.close(1012, "going away")
                return
            try:
                await ws.send(encode(event))
            except ConnectionClosed:
                return
            if event.type == "delta":
                conn.deltas_sent += 1
                if self._close_due(conn):
                    assert self.close_after_deltas is not None
                    code, self.close_after_deltas = self.close_after_deltas[1], None
                    await ws.close(code, "fake close")
                    return
                if self.kill_after_deltas is not None and conn.deltas_sent >= self.kill_after_deltas:
                    self.kill_after_deltas = None
                    ws.transport.abort()  # no close frame: what a dropped network looks like
                    if self.forget_on_kill:
                        await self._forget()
                    return

    def _close_due(self, conn: _Conn) -> bool:
        return self.close_after_deltas is not None and conn.deltas_sent >= self.close_after_deltas[0]

    # -- SSE (Starlette on uvicorn) ----------------------------------------------------------

    async def _start_sse(self) -> None:
        import uvicorn
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import JSONResponse, Response, StreamingResponse
        from starlette.routing import Route

        def error_response(error: SluiceError, status: int) -> JSONResponse:
            body = {"code": error.code.value, "message": error.message, "retryable": error.retryable}
            if error.ref is not None:
                body["ref"] = error.ref
            return JSONResponse(body, status_code=status)

        async def create(request: Request) -> Response:
            try:
                hello = decode(await request.body(), max_bytes=MAX_MESSAGE_BYTES)
            except SluiceError as error:
                return error_response(error, 400)
            if not isinstance(hello, Hello):
                return error_response(SluiceError(ErrorCode.INVALID_MESSAGE, "expected hello"), 400)
            fs, resumed, _ = self._open(hello)
            return Response(
                encode(self._welcome(fs, resumed)), status_code=201, media_type="application/json"
            )

        async def events(request: Request) -> Response:
            fs = self._sessions.get(request.path_params["session"])
            if fs is None:
                return error_response(SluiceError(ErrorCode.INVALID_REQUEST, "unknown session"), 404)
            raw = request.headers.get("last-event-id") or request.query_params.get("last_event_id") or "0"
            last_seq = int(raw) if raw.isdigit() else 0
            if fs.proto.replay(last_seq) is None:
                return error_response(SluiceError(ErrorCode.INVALID_REQUEST, "cannot replay"), 404)
            conn = _Conn()
            self._attach(fs, conn, last_seq)
            self.sse_streams += 1

            async def body() -> Any:
                try:
                    while True:
                        event = await conn.queue.get()
                        if event is None:
                            return
                        if event.type == "pong":
                            continue
                        yield encode_message(event)  # type: ignore[arg-type]
                        if event.type == "delta":
                            conn.deltas_sent += 1
                            if self._close_due(conn):
                                assert self.close_after_deltas is not None
                                code, self.close_after_deltas = self.close_after_deltas[1], None
                                yield encode_event(
                                    orjson.dumps({"code": code, "reason": "fake"}).decode(), event="close"
                                )
                                return
                            if (
                                self.kill_after_deltas is not None
                                and conn.deltas_sent >= self.kill_after_deltas
                            ):
                                self.kill_after_deltas = None
                                return
                finally:
                    self._detach(fs, conn)

            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return StreamingResponse(body(), media_type="text/event-stream", headers=headers)

        async def post(request: Request) -> Response:
            fs = self._sessions.get(request.path_params["session"])
            if fs is None:
                return error_response(SluiceError(ErrorCode.INVALID_REQUEST, "unknown session"), 404)
            try:
                message = decode(await request.body(), max_bytes=MAX_MESSAGE_BYTES)
            except SluiceError as error:
                self._refuse(fs, error)
                return error_response(error, 400)
            refusal = self._handle(fs, message, None)
            if refusal is not None:
                return error_response(refusal, 409 if refusal.code is ErrorCode.DUPLICATE_ID else 400)
            accepted = [message.id] if isinstance(message, Generate | Embed | Classify) else []
            return Response(
                orjson.dumps({"accepted": accepted}), status_code=202, media_type="application/json"
            )

        async def delete(request: Request) -> Response:
            fs = self._sessions.pop(request.path_params["session"], None)
            if fs is not None:
                for task in fs.tasks.values():
                    task.cancel()
                if fs.conn is not None:
                    fs.conn.put(None)
            return Response(status_code=204)

        app = Starlette(
            routes=[
                Route("/v1/sessions", create, methods=["POST"]),
                Route("/v1/sessions/{session}/events", events, methods=["GET"]),
                Route("/v1/sessions/{session}/messages", post, methods=["POST"]),
                Route("/v1/sessions/{session}", delete, methods=["DELETE"]),
            ]
        )
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.http_port = sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", lifespan="off")
        self._uvicorn = uvicorn.Server(config)
        self._uvicorn_task = asyncio.create_task(self._uvicorn.serve(sockets=[sock]))
        for _ in itertools.repeat(None, 200):
            if self._uvicorn.started:
                return
            await asyncio.sleep(0.01)
        raise RuntimeError("uvicorn did not start")
