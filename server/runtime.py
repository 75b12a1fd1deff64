"""The server side of one session: its request tasks, its attached connection, its pending text.

A `SessionRuntime` wraps a pure `protocol.session.Session` and does what the session says:
starts one task per accepted request (through the `Dispatcher`), cancels it on ``cancel``, and
sends every numbered event it is given to the connection attached at the time (an `Outbox`), or
to nobody: the session's event log has it either way, and a client that resumes gets it there.

Backpressure lives here because only here can text be merged before it is numbered: while the
outbox has no room (or no connection is attached), a request's tokens gather as pending text and
become one delta when room comes back, when the request ends (its pending text is numbered before
its terminal message, so order holds), when the next connection attaches, or (detached) when it
reaches `DETACHED_CHUNK_CHARS`. Past the outbox's hard bound the connection is closed 4008.

The same merger holds a fast request's deltas back when the outbox asks for it (``hold_s``, the
window W): a token that comes less than W after the request's previous delta went out is kept
pending and merged with what follows, until W after it was held, when one delta carries it all.
A request's first delta is never held, nor one that follows the previous by W or more (a stream
at 20 tokens/s never is), so the added delay is at most W (plus the loop's timer granularity),
and only where tokens come faster than a reader could tell apart. Each request is held alone:
its terminal message, a cancel or a tool call numbers its held text first, another request's
unheld delta releases it early, and without room or a connection it stays pending as under
backpressure.

Everything here runs on the event loop and nothing in the transport-facing methods awaits, so a
replay snapshot and the switch to live events happen with no event in between. This module never
touches a socket and never decodes or encodes a message.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import assert_never

from protocol.close import CloseCode
from protocol.errors import SluiceError
from protocol.messages import (
    Classify,
    ClientMessage,
    Embed,
    Generate,
    LoggedMessage,
    Pong,
    Request,
    Usage,
    Welcome,
)
from protocol.session import Accepted, CancelRequested, Ignored, Outcome, Refused, Reply, Session
from server.backends.base import ToolCall
from server.dispatcher import Dispatcher, RequestTrace
from server.metrics import Metrics
from server.outbox import Outbox

__all__ = ["DETACHED_CHUNK_CHARS", "SessionRuntime"]

log = logging.getLogger("sluice.runtime")

_IGNORED = Ignored()
# The hold window's clock (read once per token while a window is set).
_hold_clock = time.perf_counter

# With no connection attached, a generation's text is numbered in pieces of about this size, so a
# long generation costs the replay log a few large deltas instead of thousands of tiny ones.
DETACHED_CHUNK_CHARS = 16 * 1024


@dataclass(slots=True)
class _Work:
    task: asyncio.Task[None]
    trace: RequestTrace


class SessionRuntime:
    """One live session on this server. See the module docstring."""

    def __init__(
        self,
        session: Session,
        *,
        dispatcher: Dispatcher,
        metrics: Metrics,
        key_id: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.session = session
        self.key_id = key_id
        self._dispatcher = dispatcher
        self._metrics = metrics
        self._clock = clock
        self._work: dict[str, _Work] = {}
        self._pending: dict[str, list[str]] = {}
        self._pending_chars: dict[str, int] = {}
        self._pending_total = 0
        # Held deltas (the outbox's ``hold_s``): when each request's last delta went out, and the
        # timer that releases a request's held text.
        self._sent_at: dict[str, float] = {}
        self._releases: dict[str, asyncio.TimerHandle] = {}
        self._outbox: Outbox | None = None
        self._closed = False
        # When the last connection went away (None while one is attached).
        self.detached_since: float | None = clock()

    # -- state -------------------------------------------------------------------------------

    @property
    def id(self) -> str:
        return self.session.id

    @property
    def attached(self) -> bool:
        return self._live() is not None

    @property
    def outbox(self) -> Outbox | None:
        return self._outbox

    @property
    def busy(self) -> bool:
        """Whether any request is still running."""
        return bool(self._work)

    @property
    def pending_chars(self) -> int:
        return self._pending_total

    @property
    def last_seq(self) -> int:
        """Seq of the session's newest logged event (0 if none)."""
        return self.session.last_seq

    def can_replay(self, last_seq: int) -> bool:
        """Whether every event after ``last_seq`` is still in the log (a resume would be exact)."""
        return not self._closed and self.session.replay(last_seq) is not None

    # -- connections (synchronous: no event can slip between a snapshot and going live) -------

    def attach(
        self, outbox: Outbox, last_seq: int, welcome: Callable[[str, int], Welcome] | None = None
    ) -> bool:
        """Make ``outbox`` the live connection: queue ``welcome(session_id, last_seq)`` (when given:
        an SSE stream carries no welcome), then every event after ``last_seq``, then live events.
        False (and nothing changed) when the replay could not be complete; the caller then opens
        a new session. A connection already attached is taken over: its outbox is closed 4009."""
        if self._closed:
            return False
        self._flush_pending()
        replay = self.session.replay(last_seq)
        if replay is None:
            return False
        previous = self._live()
        if previous is not None:
            previous.fail(CloseCode.TAKEN_OVER, "session taken over by another connection")
        if welcome is not None:
            outbox.push(welcome(self.id, self.session.last_seq))
        outbox.push_replay(replay)
        outbox.on_room = self._on_room
        self._outbox = outbox
        self.detached_since = None
        if replay:
            self._metrics.replay(len(replay))
        return True

    def detach(self, outbox: Outbox) -> None:
        """The connection behind ``outbox`` is gone; a newer one may already have taken over."""
        if self._outbox is outbox:
            self._outbox = None
            self.detached_since = self._clock()
            outbox.on_room = None

    # -- client messages ---------------------------------------------------------------------

    def handle(self, message: ClientMessage) -> Outcome:
        """Act on one decoded client message (never awaits); what became of it, for transports
        that answer per message (SSE's ``POST .../messages``)."""
        if self._closed:
            return _IGNORED
        match message:
            case Generate() | Embed() | Classify():
                if message.id not in self.session.inflight:
                    try:
                        self._dispatcher.admit(self.key_id)
                    except SluiceError as exc:
                        exc.ref = message.id
                        refusal = self.session.refuse(exc)
                        self._send(refusal)
                        return Refused(refusal)
            case _:
                pass
        outcome = self.session.receive(message)
        match outcome:
            case Accepted(request=request):
                self._start(request)
            case CancelRequested(id=request_id):
                self._cancel(request_id)
            case Reply(message=pong):
                self._send_unnumbered(pong)
            case Refused(event=event):
                self._send(event)
            case Ignored():
                pass
            case _:
                assert_never(outcome)
        return outcome

    async def handle_all(self, messages: Sequence[ClientMessage]) -> list[Outcome]:
        """`handle` each message in order (what SSE's ``POST .../messages`` answers from); async
        for `server.seam.SessionHandle`, whose cluster sessions may ask another node."""
        return [self.handle(message) for message in messages]

    def refuse(self, error: SluiceError) -> None:
        """A message that never became a request: a numbered, id-less error (``ref`` = its id)."""
        if not self._closed:
            self._send(self.session.refuse(error))

    # -- server life -------------------------------------------------------------------------

    def goaway(self, reason: str, retry_after_ms: int) -> None:
        if not self._closed:
            self._flush_pending()
            self._send(self.session.goaway(reason, retry_after_ms))

    def fail_all(self, error: SluiceError) -> None:
        """End every running request with ``error`` and stop its work (drain timeout)."""
        for request_id, work in list(self._work.items()):
            self._flush_one(request_id)
            self._send(self.session.fail(request_id, error))
            work.task.cancel()

    def finish_connection(self, code: CloseCode, reason: str) -> None:
        """Close the attached connection once what it has queued is sent (drain)."""
        outbox = self._live()
        if outbox is not None:
            self._flush_pending()
            outbox.finish(code, reason)

    async def close(self) -> None:
        """Stop everything: cancel the running requests and wait for their tasks to end."""
        self._closed = True
        outbox = self._live()
        if outbox is not None:
            outbox.fail(CloseCode.GOING_AWAY, "session closed")
        for release in self._releases.values():
            release.cancel()
        self._releases.clear()
        tasks = [work.task for work in self._work.values()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # -- requests ----------------------------------------------------------------------------

    def _start(self, request: Request) -> None:
        trace = RequestTrace(request.type, session=self.id, request=request.id)
        task = asyncio.create_task(self._run(request, trace), name=f"sluice {self.id}/{request.id}")
        self._work[request.id] = _Work(task, trace)
        task.add_done_callback(functools.partial(self._ended, request.id))

    def _ended(self, request_id: str, task: asyncio.Task[None]) -> None:
        work = self._work.get(request_id)
        if work is None or work.task is not task:
            return  # the id was reused by a newer request after this one ended
        del self._work[request_id]
        self._sent_at.pop(request_id, None)
        release = self._releases.pop(request_id, None)
        if release is not None:
            release.cancel()
        if not self._closed and request_id in self.session.inflight and not task.cancelled():
            # Every way out of `_run` reports a terminal message; should one ever not, the
            # client still gets exactly one, rather than a request that never ends.
            log.error(
                "request ended without a terminal message", extra={"session": self.id, "request": request_id}
            )
            self._flush_one(request_id)
            self._send(self.session.fail(request_id, SluiceError.internal()))

    async def _run(self, request: Request, trace: RequestTrace) -> None:
        request_id = request.id
        self.session.start(request_id)
        try:
            match request:
                case Generate():
                    await self._generate(request, trace)
                case Embed():
                    embedded = await self._dispatcher.embed(request, key_id=self.key_id, trace=trace)
                    self._flush_one(request_id)
                    self._send(
                        self.session.embedding(
                            request_id,
                            model=embedded.model,
                            dimensions=embedded.dimensions,
                            embeddings=embedded.embeddings,
                        )
                    )
                case Classify():
                    classified = await self._dispatcher.classify(request, key_id=self.key_id, trace=trace)
                    self._send(
                        self.session.classification(
                            request_id, model=classified.model, results=classified.results
                        )
                    )
                case _:
                    assert_never(request)
        except SluiceError as exc:
            self._flush_one(request_id)
            self._send(self.session.fail(request_id, exc))
        except Exception:
            # The dispatcher maps backend exceptions; anything here is a bug of ours.
            log.exception("request crashed", extra={"session": self.id, "request": request_id})
            self._flush_one(request_id)
            self._send(self.session.fail(request_id, SluiceError.internal()))

    async def _generate(self, request: Generate, trace: RequestTrace) -> None:
        request_id = request.id
        # Each piece is numbered and sent as the dispatcher hands it on, in the backend's loop.
        finished = await self._dispatcher.relay(
            request,
            key_id=self.key_id,
            on_text=functools.partial(self._delta, request_id),
            on_call=functools.partial(self._tool_call, request_id),
            conversation=self.session.conversation(request),
            trace=trace,
        )
        # Pending text of this request is numbered before its terminal message.
        self._flush_one(request_id)
        self._send(
            self.session.done(
                request_id,
                finish_reason=finished.finish_reason,
                usage=finished.usage,
                timings=finished.timings,
                model=finished.model,
            )
        )

    def _tool_call(self, request_id: str, call: ToolCall) -> None:
        # Text the call followed is numbered before it.
        self._flush_one(request_id)
        assert call.id is not None  # the dispatcher names every call
        self._send(
            self.session.tool_call(request_id, call_id=call.id, name=call.name, arguments=call.arguments)
        )

    def _cancel(self, request_id: str) -> None:
        """The terminal message goes out now; the work is stopped after (the session drops any
        late event of it), so a backend slow to stop cannot delay the client."""
        request = self.session.inflight[request_id].request
        work = self._work.get(request_id)
        trace = work.trace if work is not None else RequestTrace(request.type)
        self._flush_one(request_id)
        self._send(
            self.session.cancelled(
                request_id,
                model=trace.model or request.model or "",
                usage=Usage(prompt_tokens=0, completion_tokens=trace.pieces),
                timings=trace.timings(),
            )
        )
        if work is not None:
            work.task.cancel()

    # -- outbound: merging and sending -------------------------------------------------------

    def _live(self) -> Outbox | None:
        outbox = self._outbox
        if outbox is not None and outbox.closed:
            return None
        return outbox

    def _delta(self, request_id: str, text: str) -> None:
        # Once per token, so the common case is inline: a live outbox with room (`has_room` is
        # False once it is closed), the hold window's check, then numbered and pushed as fields
        # (no message model is built for it).
        outbox = self._outbox
        if outbox is not None and outbox.has_room:
            hold_s = outbox.hold_s
            if hold_s:
                now = _hold_clock()
                sent = self._sent_at.get(request_id)
                if sent is not None and now - sent < hold_s:
                    self._hold(request_id, text, hold_s)
                    return
                self._sent_at[request_id] = now
                if request_id in self._pending:
                    # Its window is over before its timer fired: the held text and this token,
                    # one delta.
                    self._merge(request_id, text)
                    self._flush_one(request_id)
                    return
            if self._pending:
                self._flush_pending()
            seq = self.session.numbered_delta(request_id, text)
            if seq is not None:
                outbox.push_delta(request_id, seq, text)
            return
        outbox = self._live()
        if self._merge(request_id, text):
            self._metrics.outbound_merge()
        if outbox is None and self._pending_chars[request_id] >= DETACHED_CHUNK_CHARS:
            self._flush_one(request_id)

    def _hold(self, request_id: str, text: str, hold_s: float) -> None:
        """``text`` came less than ``hold_s`` after this request's previous delta went out: it
        waits, merged with what follows, for the release timer (armed once per window)."""
        self._merge(request_id, text)
        if request_id not in self._releases:
            loop = asyncio.get_running_loop()
            self._releases[request_id] = loop.call_later(hold_s, self._release, request_id)

    def _release(self, request_id: str) -> None:
        """A request's hold window is over: its held text goes out as one delta. Without room (or a
        connection) it stays pending for `_on_room` (or the next attach), as under backpressure."""
        self._releases.pop(request_id, None)
        outbox = self._live()
        if request_id in self._pending and outbox is not None and outbox.has_room:
            self._sent_at[request_id] = _hold_clock()
            self._flush_one(request_id)

    def _merge(self, request_id: str, text: str) -> bool:
        """Add ``text`` to the request's pending text (checked against the hard bound); whether
        there was some already (a merge)."""
        parts = self._pending.get(request_id)
        merged = parts is not None
        if parts is None:
            parts = self._pending[request_id] = []
            self._pending_chars[request_id] = 0
        parts.append(text)
        # Characters stand in for bytes here: near enough for a bound, and free to count.
        self._pending_chars[request_id] += len(text)
        self._pending_total += len(text)
        outbox = self._live()
        if outbox is not None:
            outbox.check_bound(self._pending_total)
        return merged

    def _on_room(self) -> None:
        self._flush_pending()

    def _flush_pending(self) -> None:
        for request_id in list(self._pending):
            self._flush_one(request_id)

    def _flush_one(self, request_id: str) -> None:
        parts = self._pending.pop(request_id, None)
        if parts is None:
            return
        self._pending_total -= self._pending_chars.pop(request_id)
        text = "".join(parts)
        # As `_delta`: numbered, logged and pushed from its fields, no message model built.
        seq = self.session.numbered_delta(request_id, text)
        outbox = self._live()
        if seq is not None and outbox is not None:
            outbox.push_delta(request_id, seq, text)

    def _send(self, event: LoggedMessage | None) -> None:
        if event is None:
            return
        outbox = self._live()
        if outbox is not None:
            outbox.push(event)

    def _send_unnumbered(self, message: Pong) -> None:
        outbox = self._live()
        if outbox is not None:
            outbox.push(message)
