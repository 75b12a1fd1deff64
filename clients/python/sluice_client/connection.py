"""Keeps one session connected across transports: read, route, write, reconnect, resume.

`Connection` is the asyncio shell around `ClientState`. One supervisor task reads the current
transport and routes each event to the `Sink` of its request; one writer task sends the outbox in
order. When a transport ends it reconnects with exponential backoff and jitter, saying
``hello {session, last_seq}``; the state drops whatever the replay repeats and decides what to
resend. After ``give_up_after_s`` without a connection, requests in flight fail with a retryable
error and the connection waits, disconnected, until the next request asks for it again — a
notebook left overnight reconnects when its next cell runs. A ``goaway`` stops the writer; the
reader finishes, then reconnects after the server's ``retry_after_ms``.

It never decides what a message means (that is `ClientState`) and never touches a socket itself
(that is the transports).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, assert_never

from protocol.errors import ErrorCode, SluiceError
from protocol.messages import (
    Ack,
    Cancel,
    Classification,
    Delta,
    Embedding,
    Hello,
    Ping,
    Pong,
    Request,
    ToolCall,
    Welcome,
)
from sluice_client.errors import TransportClosed, connection_failed
from sluice_client.state import Action, ClientState, Deliver, Drain, Fail, Progress, Stray, Terminal
from sluice_client.transports.base import Transport, TransportKind
from sluice_client.wire import ClientMessage, Logged, ServerEvent, Unknown, WireError, encode

__all__ = ["Backoff", "Connection", "Sink", "Status"]

logger = logging.getLogger("sluice_client")

Status = Literal["connecting", "connected", "reconnecting", "disconnected", "closed"]
Opener = Callable[[Hello], Awaitable[Transport]]
# Acknowledge at least every this many events (and after every embedding or classification).
_ACK_EVERY = 256


class Sink(Protocol):
    """Where one request's events go: its stream or its future."""

    def feed(self, event: Progress | Terminal) -> None: ...

    def fail(self, error: SluiceError) -> None: ...


@dataclass(frozen=True, slots=True)
class Backoff:
    """Reconnect delays: exponential from ``initial_s`` to ``max_s``, each with jitter."""

    initial_s: float = 0.1
    max_s: float = 5.0
    give_up_after_s: float = 60.0

    def delays(self, first_s: float | None = None) -> Iterator[float]:
        if first_s is not None:
            # The server said when to come back (goaway); spread clients over a fifth more.
            yield first_s * (1.0 + random.random() * 0.2)
        for attempt in itertools.count():
            ceiling = min(self.max_s, self.initial_s * 2.0**attempt)
            # "Equal jitter": never less than half the step, so a storm of clients still spreads.
            yield ceiling / 2 + random.uniform(0.0, ceiling / 2)


def _closed_error() -> SluiceError:
    return SluiceError(ErrorCode.CANCELLED, "the session was closed", retryable=False)


class Connection:
    """One session's live link to the server. Create, ``await start()``, then `submit`/`cancel`."""

    def __init__(
        self, opener: Opener, *, backoff: Backoff | None = None, client_name: str = "sluice-python"
    ) -> None:
        self.state = ClientState()
        self.status: Status = "connecting"
        self.transport: Transport | None = None
        self.transport_kind: TransportKind | None = None
        self.reconnects = 0
        self._opener = opener
        self._backoff = backoff or Backoff()
        self._client_name = client_name
        self._sinks: dict[str, Sink] = {}
        self._outbox: deque[ClientMessage] = deque()
        self._ready = False  # a live transport, its replay done, the outbox rebuilt for it
        self._draining = False
        self._drain_delay_s: float | None = None
        self._wake = asyncio.Event()
        self._demand = asyncio.Event()
        self._supervisor: asyncio.Task[None] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[TransportClosed] | None = None
        self._broken: TransportClosed | None = None  # why the writer gave up on the transport
        self._stopped: SluiceError | None = None
        self._pings: dict[int, asyncio.Future[None]] = {}
        self._nonces = itertools.count(1)
        self._acked = 0

    # -- public ------------------------------------------------------------------------------

    @property
    def welcome(self) -> Welcome:
        assert self.state.welcome is not None, "start() first"
        return self.state.welcome

    @property
    def inflight(self) -> list[str]:
        return list(self.state.pending)

    async def start(self) -> None:
        """Open the first transport. Raises `SluiceError` when the server cannot be reached."""
        try:
            await self._open()
        except TransportClosed as exc:
            self.status = "closed"
            raise exc.error from None
        self._supervisor = asyncio.create_task(self._supervise(), name="sluice-supervisor")
        self._writer = asyncio.create_task(self._write(), name="sluice-writer")

    def submit(self, request: Request, sink: Sink) -> None:
        """Send ``request``; its events go to ``sink``. Raises `SluiceError` if it cannot be sent."""
        if self._stopped is not None:
            raise self._stopped
        limit = self.welcome.limits.max_message_bytes
        if len(encode(request).encode()) > limit:
            raise SluiceError(
                ErrorCode.MESSAGE_TOO_LARGE, f"the request is larger than the server's {limit} bytes"
            )
        self.state.add(request)
        self._sinks[request.id] = sink
        if self._ready:
            self._push(request)
        elif self.status == "disconnected":
            self._demand.set()

    def cancel(self, request_id: str) -> None:
        """Stop ``request_id``; its sink gets the terminal message (or a ``cancelled`` error)."""
        outcome = self.state.cancel(request_id)
        match outcome:
            case "local":
                sink = self._sinks.pop(request_id, None)
                if sink is not None:
                    sink.fail(SluiceError(ErrorCode.CANCELLED, "request cancelled", retryable=False))
            case "send":
                if self._ready:
                    self._push(Cancel(type="cancel", id=request_id))
            case "none":
                pass
            case _:
                assert_never(outcome)

    async def ping(self, wait_s: float = 10.0) -> float:
        """Round-trip time to the server, in seconds."""
        nonce = next(self._nonces)
        future = self._pings[nonce] = asyncio.get_running_loop().create_future()
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            if not self._ready:
                raise SluiceError(ErrorCode.UPSTREAM_UNAVAILABLE, "not connected", retryable=True)
            self._push(Ping(type="ping", nonce=nonce))
            await asyncio.wait_for(future, wait_s)
        finally:
            self._pings.pop(nonce, None)
        return loop.time() - started

    async def close(self, *, end_session: bool = True) -> None:
        """Cancel what is in flight, close the transport, stop the tasks. Idempotent."""
        if self.status == "closed" and self._supervisor is None:
            return
        transport = self.transport if self._ready else None
        if transport is not None:
            for request_id, entry in list(self.state.pending.items()):
                if entry.sends:
                    with contextlib.suppress(TransportClosed, SluiceError, TimeoutError):
                        await asyncio.wait_for(transport.send(Cancel(type="cancel", id=request_id)), 2.0)
        self._stop(_closed_error())
        for task in (self._supervisor, self._writer, self._reader):
            if task is not None:
                task.cancel()
        for task in (self._supervisor, self._writer, self._reader):
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._supervisor = self._writer = self._reader = None
        if self.transport is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.transport.close(end_session=end_session), 5.0)
            self.transport = None

    # -- reading and reconnecting ------------------------------------------------------------

    async def _open(self) -> None:
        state = self.state
        hello = Hello(
            type="hello",
            session=state.session,
            last_seq=state.last_seq if state.session is not None else None,
            client=self._client_name,
        )
        transport = await self._opener(hello)
        self._apply(state.welcomed(transport.welcome))
        self.transport = transport
        self.transport_kind = transport.kind
        self.status = "connected"
        self._draining = False
        self._maybe_flush()

    async def _supervise(self) -> None:
        try:
            await self._keep_connected()
        except Exception:
            # A bug here must not leave requests waiting forever.
            logger.exception("sluice session %s: the connection failed", self.state.session)
            self._stop(SluiceError(ErrorCode.INTERNAL, "the client's connection failed", retryable=True))

    async def _keep_connected(self) -> None:
        while self.transport is not None:
            transport = self.transport
            self._broken = None
            self._reader = asyncio.create_task(self._read(transport), name="sluice-reader")
            await asyncio.wait([self._reader])
            closed = self._outcome(self._reader)
            self._ready = False
            self._outbox.clear()
            self.transport = None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(transport.close(), 2.0)
            if closed.fatal:
                self._stop(closed.error)
                return
            logger.info("sluice session %s: %s; reconnecting", self.state.session, closed.error.message)
            delay, self._drain_delay_s = self._drain_delay_s, None
            await self._reconnect(delay)

    def _outcome(self, reader: asyncio.Task[TransportClosed]) -> TransportClosed:
        if self._broken is not None:
            return self._broken
        if reader.cancelled():
            return TransportClosed(connection_failed("the transport was dropped"))
        failure = reader.exception()
        if failure is not None:
            logger.error("sluice session %s: reader failed", self.state.session, exc_info=failure)
            return TransportClosed(connection_failed("the reader failed"))
        return reader.result()

    async def _read(self, transport: Transport) -> TransportClosed:
        try:
            async with contextlib.aclosing(transport.events()) as events:
                async for event in events:
                    self._handle(event)
        except TransportClosed as exc:
            return exc
        return TransportClosed(connection_failed("the transport ended"))

    async def _reconnect(self, first_delay_s: float | None) -> None:
        self.status = "reconnecting"
        loop = asyncio.get_running_loop()
        while True:
            deadline = loop.time() + self._backoff.give_up_after_s
            last: SluiceError | None = None
            for delay in self._backoff.delays(first_delay_s):
                first_delay_s = None
                await asyncio.sleep(delay)
                try:
                    await self._open()
                except TransportClosed as exc:
                    if exc.fatal:
                        self._stop(exc.error)
                        return
                    last = exc.error
                except (WireError, OSError) as exc:
                    # Not translated by a transport (a bug there): count it as a failed attempt.
                    logger.warning("sluice session %s: reconnecting failed: %r", self.state.session, exc)
                    last = connection_failed(type(exc).__name__)
                else:
                    self.reconnects += 1
                    return
                if loop.time() >= deadline:
                    break
            # Give up on what is in flight, not on the session: the next request tries again.
            error = last or connection_failed("reconnecting timed out")
            self._apply(self.state.fail_all(SluiceError(error.code, error.message, retryable=True)))
            self.status = "disconnected"
            self._demand.clear()
            await self._demand.wait()
            self.status = "reconnecting"

    def _handle(self, event: ServerEvent) -> None:
        match event:
            case Welcome():
                pass
            case Pong(nonce=nonce):
                future = self._pings.get(nonce) if isinstance(nonce, int) else None
                if future is not None and not future.done():
                    future.set_result(None)
            case _:
                self._apply(self.state.receive(event))
                self._maybe_ack(event)
        self._maybe_flush()

    def _maybe_ack(self, event: Logged | Unknown) -> None:
        # Lets the server trim its replay log: results can be large, and a notebook session lives
        # for hours. Only what has been handled here is acknowledged, so a resume never needs it.
        seq = self.state.last_seq
        big = isinstance(event, Embedding | Classification)
        if self._ready and seq > self._acked and (big or seq - self._acked >= _ACK_EVERY):
            self._acked = seq
            self._push(Ack(type="ack", seq=seq))

    def _apply(self, actions: Sequence[Action]) -> None:
        for action in actions:
            match action:
                case Deliver(id=request_id, event=event):
                    sink = (
                        self._sinks.get(request_id)
                        if type(event) is Delta or type(event) is ToolCall
                        else self._sinks.pop(request_id, None)
                    )
                    if sink is not None:
                        sink.feed(event)
                case Fail(id=request_id, error=error):
                    sink = self._sinks.pop(request_id, None)
                    if sink is not None:
                        sink.fail(error)
                case Drain(retry_after_ms=retry_after_ms):
                    self._draining = True
                    self._ready = False
                    self._drain_delay_s = retry_after_ms / 1000
                case Stray(id=request_id):
                    if self._ready:
                        self._push(Cancel(type="cancel", id=request_id))
                case _:
                    assert_never(action)

    def _maybe_flush(self) -> None:
        if self._ready or self._draining or self.transport is None or not self.state.replayed:
            return
        self._acked = min(self._acked, self.state.last_seq)  # a new session starts from its own seq
        messages, ended = self.state.flush()
        for request_id in ended:
            sink = self._sinks.pop(request_id, None)
            if sink is not None:
                sink.fail(SluiceError(ErrorCode.CANCELLED, "request cancelled", retryable=False))
        self._outbox = deque(messages)
        self._ready = True
        self._wake.set()

    def _stop(self, error: SluiceError) -> None:
        self.status = "closed"
        self._stopped = error
        self._ready = False
        self._apply(self.state.fail_all(error))
        for future in self._pings.values():
            if not future.done():
                future.set_exception(error)

    # -- writing -----------------------------------------------------------------------------

    def _push(self, message: ClientMessage) -> None:
        self._outbox.append(message)
        self._wake.set()

    async def _write(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._ready and self._outbox and self.transport is not None:
                transport = self.transport
                message = self._outbox.popleft()
                self.state.sending(message)
                try:
                    await transport.send(message)
                except (OSError, RuntimeError) as exc:
                    # Not translated by the transport (a bug there): treat it as a dead transport.
                    if transport is self.transport:
                        self._break(TransportClosed(connection_failed(type(exc).__name__)))
                    break
                except TransportClosed as exc:
                    # Whatever was unsent stays unconfirmed in the state: the flush after the
                    # reconnect sends it again.
                    if transport is self.transport:
                        self._break(exc)
                    break
                except SluiceError as refusal:
                    self._apply(self.state.refused(message, refusal))

    def _break(self, closed: TransportClosed) -> None:
        """The writer found the transport unusable: end the reader so the supervisor reconnects."""
        self._ready = False
        self._broken = closed
        if self._reader is not None and not self._reader.done():
            self._reader.cancel()
