"""One session as seen from this node in cluster mode: the home's runtime, and/or a transport here.

A session has one *home*, the node whose `SessionRuntime` numbers its events, runs its requests
and writes its log (a `RedisEventLog`) to Redis. Its transport may be attached on any node; there
a `ClusterSession` feeds the transport's `Outbox` from the session's live feed in Redis, never
from the runtime directly (even when the home is this node), so that a client is only ever sent
what is already logged: a node that dies cannot have shown a client an event that no other node
can replay. Attaching is Centrifugo's recovery: join the feed first (the session's ``subs``: from
then on its home publishes what it wrote to this node's feed channel), then read the log
after ``last_seq``, queue that, then the feed's events with a newer seq, in seq order; a gap in
the feed (a pub/sub reconnect) is filled from the log again. Exactly, or `attach` says False.

The transport gives its client messages to `handle` here: on the home they go to the runtime at
once (so an SSE ``POST`` learns its outcome); elsewhere they are forwarded to the home in order
over its control channel (`Ignored` is returned: what becomes of them arrives in the feed), each
request marked in Redis first so that it runs once and ends even if the home dies while taking
it (`server.cluster.forwarding`). When
the home stopped, the node holding the transport becomes the home (`ClusterSessionRegistry`
claims the session) and handles what is queued itself. A node draining asks the home, in the same
queue, for the ``goaway`` of a transport it holds (the home numbers it like any event), and counts
as busy until that ``goaway`` reached the transport, so the drain closes it only after.

Takeover: every transport gets a token ``<node>/<generation>`` from Redis as it attaches, the
session's attach generation one more than any transport's before it, announced on the feed
(``!A <token>``) and to the home (``att``) before it goes live. A transport closes 4009 only for a
newer generation than its own, and one whose attach finishes after a newer one was announced
closes at once; so however late an announcement reaches a node, the transport that attached last
stays, and an older one never closes it. Other feed notices: ``!E`` the session ended, ``!H``
the home let go of it (then the log is read again: what the old home wrote last may not have
been published before it went).

On the home, a ``done`` that completed a ``history: true`` turn is held back from the log until
the conversation is in Redis (`ClusterSession.done_logged`, `server.cluster.histories`).

This module never talks to Redis itself: the registry (`server.cluster.sessions`) does.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from protocol.close import CloseCode
from protocol.errors import SluiceError
from protocol.messages import ChatMessage, ClientMessage, Done, Goaway, LoggedMessage, Ping, Pong, Welcome
from protocol.session import Accepted, Ignored, Outcome, Reply
from server.cluster import forwarded, forwarding
from server.cluster.eventlog import DELTA_HEAD, SEQ_FIELD, Framed, RedisEventLog, framed
from server.cluster.homes import attach_generation
from server.outbox import Outbox
from server.runtime import SessionRuntime

if TYPE_CHECKING:
    from server.cluster.sessions import ClusterSessionRegistry

__all__ = ["ClusterSession", "FeedSink", "feed_runs"]

log = logging.getLogger("sluice.cluster.session")

_IGNORED = Ignored()
_TAKEN_OVER = "session taken over by another connection"
# How many forwards' answers the home keeps (`ClusterSession.answered`).
_APPLIED_KEPT = 256
_SEQ_LEN = len(SEQ_FIELD)


class FeedSink(Outbox):
    """The home runtime's permanent connection, which sends nothing (transports get what the log
    wrote). It has room while none of the session's events wait to be written: the first token
    of a burst is numbered at once, and those that come while its write is in flight merge into
    one delta per request (the runtime's own backpressure), numbered when the write is done. So
    under load a session costs Redis about one event per request per round trip, not per token,
    and a token waits no longer than it waits anyway for the write before any transport has it."""

    __slots__ = ("_log", "_on_done", "_refused")

    def __init__(self, event_log: RedisEventLog, on_done: Callable[[Done], None]) -> None:
        super().__init__(encode=lambda message: b"", soft_bytes=1, hard_bytes=1)
        self._log = event_log
        # Each done, as it is logged (before it is written: see `ClusterSession.done_logged`).
        self._on_done = on_done
        # Whether `has_room` said no since the last idle (only then may the runtime hold text).
        self._refused = False
        event_log.on_idle = self._idle

    @property
    def has_room(self) -> bool:
        if self._log.writing:
            self._refused = True
            return False
        return True

    def check_bound(self, pending_bytes: int = 0) -> bool:
        return False  # what waits here waits for Redis, not for a slow reader

    def _idle(self) -> None:
        if self._refused and self.on_room is not None and not self.closed:
            self._refused = False
            self.on_room()

    def push(self, message: object) -> None:
        if type(message) is Done:
            self._on_done(message)

    def push_delta(self, request_id: str, seq: int, text: str) -> None:
        return None  # logged already (`RedisEventLog.append_delta`): no model is built for it

    def push_replay(self, messages: object) -> None:
        return None


class ClusterSession:
    """See the module docstring."""

    def __init__(self, registry: ClusterSessionRegistry, session_id: str, key_id: str, home: str) -> None:
        self._registry = registry
        self.id = session_id
        self.key_id = key_id
        self.home = home  # '' while unknown or none
        # Set while this node is the home.
        self.runtime: SessionRuntime | None = None
        self.event_log: RedisEventLog | None = None
        # The home's view of the transport: the token attached last, and since when none is.
        self.current: str | None = None
        self.detached_since: float | None = None
        # The newest attach generation this node has heard of (its own transports' included).
        self.newest = 0
        # The transport attached on this node, if any.
        self._outbox: Outbox | None = None
        self._token: str | None = None
        self._delivered = 0
        # Feed events held while the log is being read (attach, or filling a gap).
        self._held: list[LoggedMessage | Framed] | None = None
        self._forward: deque[dict[str, Any]] = deque()
        self._forwarder: asyncio.Task[None] | None = None
        self.ended = False
        # A goaway asked of the home that has not reached the transport here yet.
        self._goaway_due = False
        # On the home: the conversation as last saved to Redis, each message with the seq of the
        # done that completed its turn (`server.cluster.histories`).
        self.turns: list[tuple[int, ChatMessage]] = []
        # Held while this node claims the session or settles where its home is.
        self.lock = asyncio.Lock()
        # On the home: the answers to the latest forwards from other nodes, by forward id, so a
        # forward sent again (its call timed out) is answered as before, not applied twice.
        self._applied: dict[str, object] = {}

    # -- state -------------------------------------------------------------------------------

    @property
    def attached(self) -> bool:
        return self._outbox is not None and not self._outbox.closed

    @property
    def busy(self) -> bool:
        """Requests running here, or a goaway on its way to the transport here (drain waits)."""
        if self._goaway_due and self.attached and not self.ended:
            return True
        return self.runtime is not None and self.runtime.busy

    @property
    def outbox(self) -> Outbox | None:
        return self._outbox

    @property
    def attaching(self) -> bool:
        """Whether feed events are being held (an attach reading the log, or a gap filling)."""
        return self._held is not None

    @property
    def token(self) -> str | None:
        return self._token

    @property
    def last_seq(self) -> int:
        return self._delivered

    def written_after(self, last_seq: int) -> list[LoggedMessage] | None:
        """On the home, from memory: the events after ``last_seq`` that are already in Redis (the
        rest reach the transport as their writes complete); None when memory cannot tell (the
        window or the node's log budget let them go: then Redis can)."""
        event_log = self.event_log
        if event_log is None or last_seq > event_log.written_seq:
            return None
        events = event_log.after(last_seq)
        if events is None:
            return None
        written = event_log.written_seq
        return [event for event in events if event.seq <= written]

    # -- attaching (the registry joined the feed and reads the log) ---------------------------

    def begin_attach(self) -> None:
        """From now on feed events are held until `complete_attach` (or `abandon_attach`)."""
        if self._held is None:
            self._held = []

    def complete_attach(
        self,
        outbox: Outbox,
        token: str,
        replay: list[LoggedMessage],
        last_seq: int,
        welcome: Callable[[str, int], Welcome] | None,
    ) -> None:
        """Make ``outbox`` the transport here: the welcome, ``replay`` (every event after
        ``last_seq``), then what the feed brought meanwhile and after. An older transport on this
        node is closed 4009; so is ``outbox`` itself when a newer one was announced meanwhile."""
        if attach_generation(token) < self.newest:
            outbox.fail(CloseCode.TAKEN_OVER, _TAKEN_OVER)
            self.abandon_attach()
            return
        self.newest = attach_generation(token)
        previous = self._outbox
        if previous is not None and previous is not outbox:
            previous.fail(CloseCode.TAKEN_OVER, _TAKEN_OVER)
        top = last_seq + len(replay)
        self._outbox, self._token, self._delivered = outbox, token, top
        if welcome is not None:
            outbox.push(welcome(self.id, top))
        outbox.push_replay(replay)
        held, self._held = self._held or [], None
        self._deliver(held)

    def abandon_attach(self) -> None:
        """The attach failed: a transport still attached here gets what was held meanwhile."""
        held, self._held = self._held, None
        if held:
            self._deliver(held)

    def detach(self, outbox: Outbox) -> None:
        """The transport behind ``outbox`` is gone; a newer one may already have taken over."""
        if self._outbox is outbox:
            token = self._token
            self._outbox = self._token = None
            self._registry.detached(self, token)

    # -- the feed ----------------------------------------------------------------------------

    def on_written(self, events: list[LoggedMessage | Framed]) -> None:
        """On the home: ``events`` are in Redis now, so a transport here may have them."""
        if self._outbox is not None or self._held is not None:
            self._deliver(events)

    def done_logged(self, done: Done) -> None:
        """On the home, as ``done`` is logged: when it completed a turn of the conversation, the
        conversation goes to Redis first, and the log holds ``done`` back until it is there (so
        whoever sees the ``done`` anywhere finds its turn at any later home)."""
        runtime, event_log = self.runtime, self.event_log
        if runtime is None or event_log is None:
            return
        history = runtime.session.history
        seqs = {id(turn): seq for seq, turn in self.turns}
        if not history or id(history[-1]) in seqs:
            return  # no turn kept (a generation without history, or another request)
        self.turns = [(seqs.get(id(turn), done.seq), turn) for turn in history]
        event_log.hold()
        self._registry.histories.save(self.id, event_log.epoch, self.turns, event_log.unhold)

    def on_feed(self, payload: bytes) -> None:
        self.on_lines(payload.split(b"\n"))

    def on_lines(self, lines: list[bytes]) -> None:
        """This session's run of a feed payload: events' JSON and notices, in order."""
        if self.runtime is not None or (self._outbox is None and self._held is None):
            # On the home events come from its own writes (`on_written`), and with nobody to
            # send to here only the notices matter.
            for line in lines:
                if line.startswith(b"!"):
                    self._notice(line)
            return
        outbox = self._outbox
        if self._held is None and outbox is not None and outbox.sends_json and not outbox.closed:
            # The usual run, in one flat loop: deltas that follow the last one delivered, each
            # handed to the transport as its frame, with no event built for it. The first line
            # that is anything else (a notice, another event, a seq out of turn) and all after it
            # take the general path below.
            delivered, push_frame, start = self._delivered, outbox.push_frame, 0
            for line in lines:
                if not line.startswith(DELTA_HEAD):
                    break
                at = line.find(SEQ_FIELD) + _SEQ_LEN
                seq = int(line[at : line.index(b",", at)])
                if seq != delivered + 1:
                    break
                push_frame(line.decode())
                self._delivered = delivered = seq
                start += 1
            if start == len(lines):
                return
            lines = lines[start:]
        events: list[LoggedMessage | Framed] = []
        for line in lines:
            if line.startswith(b"!"):
                if events:
                    self._deliver(events)
                    events = []
                self._notice(line)
            else:
                events.append(framed(line))
        if events:
            self._deliver(events)

    def _deliver(self, events: Sequence[LoggedMessage | Framed]) -> None:
        if self._held is not None:
            self._held.extend(events)
            return
        outbox = self._outbox
        if outbox is None or outbox.closed:
            return
        # A delta as it was logged goes as its frame, never decoded (`push_frame`).
        push_frame = outbox.push_frame if outbox.sends_json else None
        for index, event in enumerate(events):
            seq = event.seq
            if seq <= self._delivered:
                continue  # the log gave it already
            if seq != self._delivered + 1:
                self._held = list(events[index:])
                self._registry.fill_gap(self, self._delivered)
                return
            if isinstance(event, Framed):
                if push_frame is not None:
                    push_frame(event.frame)
                else:
                    outbox.push(event.event())
            else:
                outbox.push(event)
                if isinstance(event, Goaway):
                    self._goaway_due = False
            self._delivered = seq

    def gap_filled(self, events: list[LoggedMessage] | None) -> None:
        """The log's events after the last delivered one (None: the log no longer has them all)."""
        held, self._held = self._held or [], None
        if events is None:
            if self._outbox is not None:
                self._outbox.fail(CloseCode.GOING_AWAY, "events were lost: resume to find out")
            return
        self._deliver(events)
        self._deliver(held)

    def resync(self) -> None:
        """The feed may have missed payloads (pub/sub reconnected): read the log after the last
        delivered event."""
        if self._outbox is not None and self._held is None:
            self._held = []
            self._registry.fill_gap(self, self._delivered)

    def _notice(self, line: bytes) -> None:
        kind, _, arg = line[1:].partition(b" ")
        if kind == b"A":
            self.announced(arg.decode())
        elif kind == b"E":
            self.ended = True
            if self._outbox is not None:
                self._outbox.fail(CloseCode.GOING_AWAY, "session closed")
        elif kind == b"H":
            self.home = ""
            if self.attached:
                self._registry.adopt(self)
                self.resync()

    def announced(self, token: str) -> None:
        """A transport attached as ``token``, somewhere (a ``!A`` notice, or an ``att`` at the
        home): a transport here of an older generation closes 4009."""
        generation = attach_generation(token)
        self.newest = max(self.newest, generation)
        if self.runtime is not None and generation > attach_generation(self.current):
            self.current, self.detached_since = token, None
        if self._outbox is not None and generation > attach_generation(self._token):
            self._outbox.fail(CloseCode.TAKEN_OVER, _TAKEN_OVER)

    def departed(self, token: str | None, now: float) -> None:
        """At the home: the transport ``token`` went away (its ``det`` may overtake its ``att``)."""
        if attach_generation(token) > attach_generation(self.current) and token is not None:
            self.announced(token)
        if self.current == token and self.detached_since is None:
            self.detached_since = now

    # -- client messages ---------------------------------------------------------------------

    def handle(self, message: ClientMessage) -> Outcome:
        """Act on one decoded client message; see the module docstring."""
        if isinstance(message, Ping):
            pong = Pong(nonce=message.nonce)
            if self._outbox is not None:
                self._outbox.push(pong)
            return Reply(pong)
        if self.runtime is not None and not self._forward:
            return self.handle_here(message)
        self._queue({"op": "msg", "m": forwarded.dump(message)})
        return _IGNORED

    async def handle_all(self, messages: Sequence[ClientMessage]) -> list[Outcome]:
        """`handle` each message and say what became of it, asking the home when it is elsewhere."""
        if self.runtime is not None and not self._forward:
            return [self.handle(message) for message in messages]
        return await forwarding.submit(self._registry, self, messages)

    def handle_here(self, message: ClientMessage) -> Outcome:
        """On the home: give ``message`` to the runtime and record an accepted request."""
        assert self.runtime is not None and self.event_log is not None
        outcome = self.runtime.handle(message)
        if isinstance(outcome, Accepted):
            self.event_log.started(outcome.request.id)
        return outcome

    def answered(self, forward_id: str | None) -> object:
        """On the home: the answer given to forward ``forward_id`` from another node, if it was
        applied already (whatever it was, None included); `forwarding.NOT_APPLIED` when it was not."""
        if forward_id is None:
            return forwarding.NOT_APPLIED
        return self._applied.get(forward_id, forwarding.NOT_APPLIED)

    def remember(self, forward_id: str | None, answer: object) -> None:
        if forward_id is not None:
            self._applied[forward_id] = answer
            while len(self._applied) > _APPLIED_KEPT:
                del self._applied[next(iter(self._applied))]

    def lost(self, request_ids: list[str], error: SluiceError) -> None:
        """On the home: end with ``error`` requests another node took from the client and never
        handed on (it stopped first: `forwarding.orphans`). Logged straight into the session: the
        home's transports, like every node's, get them from the log's writes."""
        if self.runtime is not None:
            for request_id in request_ids:
                self.runtime.session.lost(request_id, error)

    def refuse(self, error: SluiceError) -> None:
        if self.runtime is not None and not self._forward:
            self.runtime.refuse(error)
            return
        self._queue({"op": "refuse", **forwarded.refusal_fields(error)})

    def goaway(self, reason: str, retry_after_ms: int) -> None:
        """This node drains: a goaway for the transport here, numbered by the home."""
        if self.runtime is not None and not self._forward:
            self.runtime.goaway(reason, retry_after_ms)
        elif self.attached:
            self._goaway_due = True
            self._queue({"op": "goaway", "reason": reason, "ms": retry_after_ms})

    def fail_all(self, error: SluiceError) -> None:
        if self.runtime is not None:
            self.runtime.fail_all(error)

    def finish_connection(self, code: CloseCode, reason: str) -> None:
        if self._outbox is not None and not self._outbox.closed:
            self._outbox.finish(code, reason)

    def _queue(self, message: dict[str, Any]) -> None:
        self._forward.append(message)
        if self._forwarder is None:
            self._forwarder = asyncio.create_task(self._send_forward(), name=f"sluice forward {self.id}")

    async def _send_forward(self) -> None:
        try:
            while self._forward and not self.ended:
                if not await forwarding.forward(self._registry, self, self._forward[0]):
                    continue  # the registry found the home again (or became it): try once more
                self._forward.popleft()
        except Exception:
            log.exception("forwarding to the session's home failed", extra={"session": self.id})
            self._forward.clear()
        finally:
            self._forwarder = None


def feed_runs(payload: bytes) -> Iterator[tuple[str, list[bytes]]]:
    """A node's feed payload as (session id, that session's lines) runs, in order."""
    session, lines = "", list[bytes]()
    for line in payload.split(b"\n"):
        if line.startswith(b"#"):
            if lines:
                yield session, lines
            session, lines = line[1:].decode(), []
        else:
            lines.append(line)
    if lines:
        yield session, lines
