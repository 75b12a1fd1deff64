"""The session state machine of PROTOCOL.md §1-2, sans-I/O.

A `Session` takes decoded client messages (`receive`) and the server's progress reports (`start`,
`delta`, `tool_call`, `done`, `embedding`, `classification`, `fail`, `cancelled`, `goaway`) and
returns what to do or what to send. It owns everything the contract numbers and remembers:

- ``seq``: every server message except ``welcome``/``pong`` gets the next one (from 1, no gaps),
  and is appended to the event log *before* it is returned, so whatever the caller sends can be
  replayed;
- the requests in flight: ids unique among them, at most ``max_inflight``, each walking the
  lifecycle table to exactly one terminal message, with nothing for that id after it;
- resume: `replay` gives every event after a ``last_seq`` or ``None`` when that cannot be
  complete (the caller then opens a new session: never a partial recovery);
- ``ack`` trimming, and the conversation kept for ``history: true`` (a reply's tool calls stay on
  its assistant turn);
- each generation's tool calls, numbered by ``index`` from 0 within the request.

It never awaits, sends, times or runs anything: the transport feeds it and sends what it returns,
the dispatcher starts and stops work when told to (`Accepted`, `CancelRequested`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeAlias, TypeVar, assert_never

from protocol.conversation import conversation, own_turns
from protocol.errors import ErrorCode, SluiceError
from protocol.eventlog import DeltaLog, EventLog, MemoryEventLog
from protocol.lifecycle import Event, Lifecycle, State
from protocol.messages import (
    Ack,
    Cancel,
    ChatMessage,
    Classification,
    Classify,
    ClientMessage,
    Delta,
    Done,
    Embed,
    Embedding,
    Error,
    FinishReason,
    Generate,
    Goaway,
    Hello,
    LabelScore,
    LoggedMessage,
    Ping,
    Pong,
    Request,
    RequestKind,
    Timings,
    ToolCall,
    Usage,
)
from protocol.tools import FunctionCall, MessageToolCall

__all__ = [
    "Accepted",
    "CancelRequested",
    "Ignored",
    "InflightRequest",
    "Outcome",
    "Refused",
    "Reply",
    "Session",
    "SessionLimits",
]

_E = TypeVar("_E", Delta, ToolCall, Done, Embedding, Classification, Error, Goaway)


@dataclass(frozen=True, slots=True)
class SessionLimits:
    max_inflight: int = 64
    replay_events: int = 4096
    # The log also keeps at least this many bytes of encoded events (PROTOCOL.md §2; the server
    # passes its `replay_bytes` setting, 4 MiB by default). 0: counted by events only.
    replay_bytes: int = 0
    # Messages (user and assistant) kept for ``history: true``; the oldest turns go first.
    history_messages: int = 256


# ---------------------------------------------------------------------------------------------
# What `Session.receive` tells the caller to do next.


@dataclass(frozen=True, slots=True)
class Accepted:
    """The request is now queued in the session: start work for it."""

    request: Request


@dataclass(frozen=True, slots=True)
class CancelRequested:
    """The request is in flight: stop its work, then report `Session.cancelled` (or its result)."""

    id: str


@dataclass(frozen=True, slots=True)
class Reply:
    """An unnumbered answer (``pong``): send it now."""

    message: Pong


@dataclass(frozen=True, slots=True)
class Refused:
    """The message did not become a request: send this numbered, already logged error."""

    event: Error


@dataclass(frozen=True, slots=True)
class Ignored:
    """Nothing to send and nothing to do."""


Outcome: TypeAlias = Accepted | CancelRequested | Reply | Refused | Ignored

_IGNORED = Ignored()


class InflightRequest(Lifecycle):
    """A request between `Accepted` and its terminal message."""

    __slots__ = ("_calls", "_reply", "call_count", "kind", "request")

    def __init__(self, request: Request) -> None:
        super().__init__()
        self.request = request
        self.kind: RequestKind = request.type
        # Tool calls made so far (the next call's index).
        self.call_count = 0
        # Pieces of generated text and the calls, kept only for ``history: true`` generations.
        keep = isinstance(request, Generate) and request.history
        self._reply: list[str] | None = [] if keep else None
        self._calls: list[MessageToolCall] | None = [] if keep else None


class Session:
    """One session's protocol state. See the module docstring for the rules it keeps."""

    __slots__ = ("_append_delta", "_history", "_inflight", "_log", "_seq", "id", "limits")

    def __init__(
        self,
        session_id: str,
        limits: SessionLimits,
        log: EventLog | None = None,
        history: Sequence[ChatMessage] = (),
    ) -> None:
        self.id = session_id
        self.limits = limits
        if log is None:
            log = MemoryEventLog(limits.replay_events, max_bytes=limits.replay_bytes)
        self._log: EventLog = log
        self._append_delta = log.append_delta if isinstance(log, DeltaLog) else None
        # A log handed in may already hold this session's past (a store that outlived a node).
        self._seq = self._log.last_seq
        self._inflight: dict[str, InflightRequest] = {}
        # A history handed in is the session's conversation as a store kept it (a new home).
        self._history: list[ChatMessage] | None = list(history) or None

    # -- state -----------------------------------------------------------------------------

    @property
    def last_seq(self) -> int:
        """Seq of the newest logged event, 0 if none."""
        return self._seq

    @property
    def inflight(self) -> Mapping[str, InflightRequest]:
        return self._inflight

    @property
    def log(self) -> EventLog:
        return self._log

    @property
    def history(self) -> tuple[ChatMessage, ...]:
        return tuple(self._history or ())

    # -- client messages -------------------------------------------------------------------

    def receive(self, message: ClientMessage) -> Outcome:
        """Handle one decoded client message and say what the caller must do next."""
        match message:
            case Generate() | Embed() | Classify():
                return self._accept(message)
            case Cancel(id=request_id):
                return CancelRequested(request_id) if request_id in self._inflight else _IGNORED
            case Ping(nonce=nonce):
                return Reply(Pong(nonce=nonce))
            case Ack(seq=seq):
                self._log.trim(min(seq, self._seq))
                return _IGNORED
            case Hello():
                error = SluiceError(ErrorCode.INVALID_MESSAGE, "hello is only allowed as the first message")
                return Refused(self.refuse(error))
            case _:
                assert_never(message)

    def _accept(self, request: Request) -> Accepted | Refused:
        if request.id in self._inflight:
            error = SluiceError(
                ErrorCode.DUPLICATE_ID, f"a request with id {request.id!r} is in flight", ref=request.id
            )
            return Refused(self.refuse(error))
        if len(self._inflight) >= self.limits.max_inflight:
            error = SluiceError(
                ErrorCode.TOO_MANY_INFLIGHT,
                f"at most {self.limits.max_inflight} requests may be in flight",
                ref=request.id,
            )
            return Refused(self.refuse(error))
        self._inflight[request.id] = InflightRequest(request)
        return Accepted(request)

    def refuse(self, error: SluiceError) -> Error:
        """A numbered, logged error for a message that never became a request (``ref`` = its id)."""
        return self._log_event(
            Error(
                seq=self._seq + 1,
                ref=error.ref,
                code=error.code,
                message=error.message,
                retryable=error.retryable,
                retry_after_ms=error.retry_after_ms,
            )
        )

    # -- progress reported by the server ---------------------------------------------------

    def start(self, request_id: str) -> None:
        """The work for `request_id` began (queued → running). Does nothing if it already ended."""
        entry = self._inflight.get(request_id)
        if entry is not None:
            entry.fire(Event.START)

    def delta(self, request_id: str, text: str) -> Delta | None:
        """The next piece of a generation; ``None`` when the request already ended."""
        if not self._piece(request_id, text):
            return None
        return self._log_event(Delta(id=request_id, seq=self._seq + 1, text=text))

    def numbered_delta(self, request_id: str, text: str) -> int | None:
        """`delta` for the hot path: the piece is logged as that delta and its seq returned (the
        caller builds the frame from ``request_id``, the seq and ``text``); ``None`` when the
        request already ended. A `DeltaLog` (a `MemoryEventLog`, a cluster home's log) takes the
        fields as they are, so no model is built; any other log is given the `Delta`."""
        # `_piece`, inlined for a running generation (once per token).
        entry = self._inflight.get(request_id)
        if entry is None:
            return None
        if entry.state is not State.RUNNING or entry.kind != "generate":
            self._running(request_id, "generate")  # once per request: start it, or raise
        if entry._reply is not None:
            entry._reply.append(text)
        seq = self._seq + 1
        append_delta = self._append_delta
        if append_delta is not None:
            append_delta(request_id, seq, text)
        else:
            self._log.append(Delta(id=request_id, seq=seq, text=text))
        self._seq = seq
        return seq

    def _piece(self, request_id: str, text: str) -> bool:
        """Whether the generation `request_id` is still running (starting it if it was queued), its
        reply kept for history; what `delta` and `numbered_delta` check before numbering."""
        entry = self._inflight.get(request_id)
        if entry is None:
            return False
        if entry.state is not State.RUNNING or entry.kind != "generate":
            self._running(request_id, "generate")  # once per request: start it, or raise
        if entry._reply is not None:
            entry._reply.append(text)
        return True

    def tool_call(self, request_id: str, *, call_id: str, name: str, arguments: str) -> ToolCall | None:
        """One complete tool call of a generation, ``index`` counting from 0 within the request;
        ``None`` when the request already ended."""
        entry = self._running(request_id, "generate")
        if entry is None:
            return None
        index = entry.call_count
        entry.call_count += 1
        if entry._calls is not None:
            # Made by the server, not parsed from a client: kept as they are.
            call = FunctionCall.model_construct(name=name, arguments=arguments)
            entry._calls.append(MessageToolCall.model_construct(id=call_id, type="function", function=call))
        return self._log_event(
            ToolCall(
                id=request_id, seq=self._seq + 1, index=index, call_id=call_id, name=name, arguments=arguments
            )
        )

    def done(
        self,
        request_id: str,
        *,
        finish_reason: FinishReason,
        usage: Usage,
        timings: Timings,
        model: str,
    ) -> Done | None:
        """The terminal ``done`` of a generation; ``None`` when the request already ended."""
        if finish_reason == "cancelled":
            return self._cancelled_done(request_id, model=model, usage=usage, timings=timings)
        entry = self._finish(request_id, "generate", Event.FINISH)
        if entry is None:
            return None
        if entry._reply is not None:
            self._remember(entry, "".join(entry._reply))
        return self._log_event(
            Done(
                id=request_id,
                seq=self._seq + 1,
                finish_reason=finish_reason,
                usage=usage,
                timings=timings,
                model=model,
            )
        )

    def embedding(
        self,
        request_id: str,
        *,
        model: str,
        dimensions: int,
        embeddings: list[list[float]] | list[str],
    ) -> Embedding | None:
        """The terminal result of an ``embed``; ``None`` when the request already ended."""
        if self._finish(request_id, "embed", Event.FINISH) is None:
            return None
        return self._log_event(
            Embedding(
                id=request_id, seq=self._seq + 1, model=model, dimensions=dimensions, embeddings=embeddings
            )
        )

    def classification(
        self, request_id: str, *, model: str, results: list[list[LabelScore]]
    ) -> Classification | None:
        """The terminal result of a ``classify``; ``None`` when the request already ended."""
        if self._finish(request_id, "classify", Event.FINISH) is None:
            return None
        return self._log_event(Classification(id=request_id, seq=self._seq + 1, model=model, results=results))

    def fail(self, request_id: str, error: SluiceError) -> Error | None:
        """The terminal ``error`` of a request; ``None`` when the request already ended."""
        if self._finish(request_id, None, Event.FAIL) is None:
            return None
        return self._request_error(request_id, error)

    def lost(self, request_id: str, error: SluiceError) -> Error | None:
        """The terminal ``error`` of a request that was taken from its client but never reached
        this session (in cluster mode: the node that took it stopped before handing it on);
        ``None`` when one of that id is in flight here (its own end is still to come)."""
        if request_id in self._inflight:
            return None
        return self._request_error(request_id, error)

    def _request_error(self, request_id: str, error: SluiceError) -> Error:
        return self._log_event(
            Error(
                id=request_id,
                seq=self._seq + 1,
                code=error.code,
                message=error.message,
                retryable=error.retryable,
                retry_after_ms=error.retry_after_ms,
            )
        )

    def cancelled(
        self,
        request_id: str,
        *,
        model: str,
        usage: Usage | None = None,
        timings: Timings | None = None,
    ) -> Done | Error | None:
        """The terminal message of a cancelled request: ``done`` (``finish_reason: cancelled``) for
        a generation, ``error`` code ``cancelled`` otherwise; ``None`` when it already ended."""
        entry = self._inflight.get(request_id)
        if entry is None:
            return None
        if entry.kind == "generate":
            return self._cancelled_done(request_id, model=model, usage=usage, timings=timings)
        self._finish(request_id, None, Event.CANCEL)
        return self._log_event(
            Error(
                id=request_id,
                seq=self._seq + 1,
                code=ErrorCode.CANCELLED,
                message="request cancelled",
                retryable=False,
            )
        )

    def goaway(self, reason: str, retry_after_ms: int) -> Goaway:
        """A numbered ``goaway``: the server is draining."""
        return self._log_event(Goaway(seq=self._seq + 1, reason=reason, retry_after_ms=retry_after_ms))

    # -- resume and history ----------------------------------------------------------------

    def replay(self, last_seq: int) -> list[LoggedMessage] | None:
        """Every logged event with ``seq > last_seq``, in order; ``None`` when that list could not be
        complete (trimmed or evicted events, or a ``last_seq`` this session never reached)."""
        if last_seq > self._seq or last_seq < 0:
            return None
        return self._log.after(last_seq)

    def conversation(self, request: Generate) -> list[ChatMessage]:
        """The turns to generate from: ``system`` first if given, then (for ``history: true``) the
        session's earlier turns, then this request's own prompt or messages."""
        return conversation(request, self._history or ())

    # -- internals -------------------------------------------------------------------------

    def _log_event(self, event: _E) -> _E:
        self._log.append(event)
        self._seq = event.seq
        return event

    def _running(self, request_id: str, kind: RequestKind) -> InflightRequest | None:
        entry = self._inflight.get(request_id)
        if entry is None:
            return None
        _check_kind(entry, kind)
        if entry.state is State.QUEUED:
            # Output proves the work started, even if the caller never said so.
            entry.fire(Event.START)
        return entry

    def _finish(self, request_id: str, kind: RequestKind | None, event: Event) -> InflightRequest | None:
        entry = self._inflight.get(request_id)
        if entry is None:
            return None
        if kind is not None:
            _check_kind(entry, kind)
        if event is Event.FINISH and entry.state is State.QUEUED:
            entry.fire(Event.START)
        entry.fire(event)
        del self._inflight[request_id]
        return entry

    def _cancelled_done(
        self, request_id: str, *, model: str, usage: Usage | None, timings: Timings | None
    ) -> Done | None:
        entry = self._finish(request_id, "generate", Event.CANCEL)
        if entry is None:
            return None
        return self._log_event(
            Done(
                id=request_id,
                seq=self._seq + 1,
                finish_reason="cancelled",
                usage=usage if usage is not None else Usage(prompt_tokens=0, completion_tokens=0),
                timings=timings if timings is not None else Timings(queue_ms=0.0, ttft_ms=None, total_ms=0.0),
                model=model,
            )
        )

    def _remember(self, entry: InflightRequest, reply: str) -> None:
        request = entry.request
        assert isinstance(request, Generate)
        history = self._history if self._history is not None else []
        history.extend(own_turns(request, include_system=False))
        history.append(ChatMessage(role="assistant", content=reply, tool_calls=entry._calls or None))
        excess = len(history) - self.limits.history_messages
        if excess > 0:
            del history[:excess]
        # A tool turn whose call was trimmed away would answer nothing: it goes too.
        while history and history[0].role == "tool":
            del history[0]
        self._history = history


def _check_kind(entry: InflightRequest, kind: RequestKind) -> None:
    if entry.kind != kind:
        raise ValueError(f"request {entry.request.id!r} is a {entry.kind} request, not {kind}")
