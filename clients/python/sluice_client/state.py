"""What one client session knows and decides, sans-I/O: requests in flight, seq, resume, resend.

`ClientState` takes the server's messages (`welcomed`, `receive`, `refused`) and the caller's
wishes (`add`, `cancel`) and answers with `Action` values for the connection to carry out, plus
`flush`: what to (re)send on a fresh transport once the replay is over. The rules it keeps:

- **No duplicates.** ``seq`` only grows; an event at or below the last one seen is a replay of
  something already delivered and is dropped.
- **Resend only what the server may not have.** A request is *confirmed* once any event for it
  arrived; until then it may have been lost with the old transport, so `flush` sends it again —
  after the replay (``welcome.last_seq``), so a request that finished meanwhile is seen finished
  first. A ``duplicate_id`` refusal of such a resend means the server had it all along: ignored.
- **Never a partial result.** When the server answers a resume with a new session
  (``resumed: false``), a request that already produced output, or that depends on the lost
  conversation (``history: true``), fails with a retryable error; one with no output yet is simply
  sent to the new session.

It never awaits, sends or times anything; `Connection` does, and its tests drive this directly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal, TypeAlias, assert_never

from protocol.errors import ErrorCode, SluiceError
from protocol.messages import (
    Cancel,
    Classification,
    Delta,
    Done,
    Embedding,
    Error,
    Generate,
    Goaway,
    Request,
    ToolCall,
    Welcome,
)
from sluice_client.errors import from_wire, session_lost
from sluice_client.wire import ClientMessage, Logged, Unknown

__all__ = [
    "Action",
    "CancelOutcome",
    "ClientState",
    "Deliver",
    "Drain",
    "Fail",
    "Pending",
    "Progress",
    "Stray",
    "Terminal",
]

logger = logging.getLogger("sluice_client")

Terminal: TypeAlias = Done | Embedding | Classification
# Events of a request before its terminal one: text, and a generation's tool calls.
Progress: TypeAlias = Delta | ToolCall
CancelOutcome = Literal["send", "local", "none"]
# Ids of stray output already answered with a cancel; bounded so a long session cannot grow it.
_MAX_STRAYS = 1024


@dataclass(slots=True)
class Pending:
    """A request between `ClientState.add` and its terminal message."""

    request: Request
    confirmed: bool = False  # an event for it arrived: the server knows this id
    sends: int = 0  # times it was handed to a transport
    cancelling: bool = False


@dataclass(frozen=True, slots=True)
class Deliver:
    """Hand this event to the request's consumer; a `Terminal` ends the request."""

    id: str
    event: Progress | Terminal


@dataclass(frozen=True, slots=True)
class Fail:
    """The request ended with this error."""

    id: str
    error: SluiceError


@dataclass(frozen=True, slots=True)
class Drain:
    """The server is draining (``goaway``): stop sending, read to the end, reconnect after the delay."""

    retry_after_ms: int


@dataclass(frozen=True, slots=True)
class Stray:
    """Output for a request nobody waits for any more: tell the server to stop it."""

    id: str


Action: TypeAlias = Deliver | Fail | Drain | Stray


@dataclass(slots=True)
class ClientState:
    """One session as the client sees it. See the module docstring for the rules."""

    session: str | None = None
    welcome: Welcome | None = None
    last_seq: int = 0
    # Seq the server had logged when it welcomed this transport: events up to it are the replay.
    replay_until: int = 0
    pending: dict[str, Pending] = field(default_factory=dict)
    _strays: set[str] = field(default_factory=set)

    @property
    def replayed(self) -> bool:
        """Whether every event the server had logged at welcome time has arrived."""
        return self.last_seq >= self.replay_until

    def add(self, request: Request) -> Pending:
        if request.id in self.pending:
            raise ValueError(f"a request with id {request.id!r} is already in flight")
        entry = self.pending[request.id] = Pending(request)
        return entry

    def welcomed(self, welcome: Welcome) -> list[Fail]:
        """A transport opened. Returns the requests lost with the old session, if it was lost."""
        lost: list[Fail] = []
        if not welcome.resumed:
            if self.session is not None:
                logger.warning(
                    "sluice session %s could not be resumed; continuing as new session %s",
                    self.session,
                    welcome.session,
                )
            for request_id, entry in list(self.pending.items()):
                depends_on_history = isinstance(entry.request, Generate) and entry.request.history
                if entry.confirmed or depends_on_history or entry.cancelling:
                    del self.pending[request_id]
                    if entry.cancelling:
                        # Cancelled and forgotten by the server: nothing more will come for it.
                        lost.append(Fail(request_id, _cancelled()))
                    else:
                        lost.append(Fail(request_id, session_lost()))
                else:
                    # Never seen by the new session: a duplicate_id from it would be genuine.
                    entry.sends = 0
            self.last_seq = welcome.last_seq
            self._strays.clear()
        self.session = welcome.session
        self.welcome = welcome
        self.replay_until = welcome.last_seq
        return lost

    def receive(self, event: Logged | Unknown) -> list[Action]:
        """One numbered server message: what to do with it (nothing, if it is a replayed duplicate)."""
        if event.seq is None or event.seq <= self.last_seq:
            return []
        if event.seq != self.last_seq + 1 and self.last_seq >= self.replay_until:
            logger.warning(
                "sluice session %s: seq jumped from %d to %d", self.session, self.last_seq, event.seq
            )
        self.last_seq = event.seq
        match event:
            case Delta(id=request_id) | ToolCall(id=request_id):
                entry = self.pending.get(request_id)
                if entry is None:
                    return self._stray(request_id)
                entry.confirmed = True
                return [Deliver(request_id, event)]
            case Done(id=request_id) | Embedding(id=request_id) | Classification(id=request_id):
                if self.pending.pop(request_id, None) is None:
                    return []
                return [Deliver(request_id, event)]
            case Error():
                return self._error(event)
            case Goaway(retry_after_ms=retry_after_ms):
                return [Drain(retry_after_ms)]
            case Unknown():
                return []
            case _:
                assert_never(event)

    def _error(self, event: Error) -> list[Action]:
        if event.id is not None:
            return [Fail(event.id, from_wire(event))] if self.pending.pop(event.id, None) else []
        if event.ref is None:
            logger.warning("sluice session %s: the server refused a message: %s", self.session, event.message)
            return []
        entry = self.pending.get(event.ref)
        if entry is None:
            return []
        if event.code is ErrorCode.DUPLICATE_ID and entry.sends > 1:
            # Our resend after a reconnect: the server has had this request in flight all along.
            entry.confirmed = True
            return []
        del self.pending[event.ref]
        return [Fail(event.ref, from_wire(event))]

    def refused(self, message: ClientMessage, error: SluiceError) -> list[Action]:
        """The transport refused ``message`` outright (an HTTP 4xx to a POST of the SSE transport)."""
        request_id = getattr(message, "id", None)
        entry = self.pending.get(request_id) if isinstance(request_id, str) else None
        if entry is None or message is not entry.request:
            return []
        if error.code is ErrorCode.DUPLICATE_ID and entry.sends > 1:
            entry.confirmed = True
            return []
        del self.pending[entry.request.id]
        return [Fail(entry.request.id, error)]

    def _stray(self, request_id: str) -> list[Action]:
        if request_id in self._strays:
            return []
        if len(self._strays) >= _MAX_STRAYS:
            self._strays.clear()
        self._strays.add(request_id)
        return [Stray(request_id)]

    def sending(self, message: ClientMessage) -> None:
        """``message`` is about to go out (counted before the write: it may arrive even if that fails)."""
        request_id = getattr(message, "id", None)
        entry = self.pending.get(request_id) if isinstance(request_id, str) else None
        if entry is not None and message is entry.request:
            entry.sends += 1

    def cancel(self, request_id: str) -> CancelOutcome:
        """The caller wants ``request_id`` stopped.

        ``"local"``: it never left the client, it is gone now and nothing needs sending.
        ``"send"``: send ``cancel``; the server answers with the request's terminal message.
        ``"none"``: it already ended (or is being cancelled).
        """
        entry = self.pending.get(request_id)
        if entry is None or entry.cancelling:
            return "none"
        if entry.sends == 0:
            del self.pending[request_id]
            return "local"
        entry.cancelling = True
        return "send"

    def flush(self) -> tuple[list[ClientMessage], list[str]]:
        """What a fresh transport must carry, once `replayed`, and the requests that ended here.

        Requests not yet confirmed are (re)sent; cancels are repeated (they are idempotent). A
        cancelled request the server never confirmed may never get a terminal message (the server
        may not have it), so it ends here and its id is in the second list.
        """
        messages: list[ClientMessage] = []
        ended: list[str] = []
        for request_id, entry in list(self.pending.items()):
            if entry.cancelling:
                messages.append(Cancel(type="cancel", id=request_id))
                if not entry.confirmed:
                    del self.pending[request_id]
                    ended.append(request_id)
            elif not entry.confirmed:
                messages.append(entry.request)
        return messages, ended

    def fail_all(self, error: SluiceError) -> list[Fail]:
        """Every request in flight ends with ``error`` (the client gave up, or is closing)."""
        failed = [Fail(request_id, error) for request_id in self.pending]
        self.pending.clear()
        return failed


def _cancelled() -> SluiceError:
    return SluiceError(ErrorCode.CANCELLED, "request cancelled", retryable=False)
