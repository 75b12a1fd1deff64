"""The Redis-backed event log: what a session's home node logs, written through to Redis.

`RedisEventLog` is the `protocol.eventlog.EventLog` a cluster-mode session is built with. It
keeps the events in memory, in a `MemoryEventLog` (the home replays from there, with no await)
that shares the node's `LogBudget` with every other session homed there, so that the budget may
shed it (it tracks Redis's window apart, so a shed copy never shortens what Redis keeps; a replay
it can no longer serve reads Redis), and hands each appended event to the node's `LogWriter`, which writes every session's new
events together: the first event of a quiet moment waits `WRITE_WINDOW_S` for others, then one
`scripts.APPEND` call carries every session that changed, one command and one reply per round
trip, never one per token or per session (packed here, what never changes for a session packed
once, and written on the store's own connection: `RedisStore.round_trip`). The same call
publishes what it logged, once per node that holds a transport of any of those sessions (one
payload per node, every session's events in it: `server.cluster.scripts`), never before Redis
logged it. Each event is encoded once, as it is appended: that JSON is what Redis logs, what the
feed carries and the text frame a transport sends. While a write is in flight the next events
gather, and the next write starts no sooner than `WRITE_INTERVAL_S` after the last one started,
so a slow Redis or a busy node means larger batches, not more round trips. The home sends a
transport only what a write confirmed (`RedisEventLog.on_written`), so no client ever has an
event that a node's death could lose. The append script numbers nothing (the session did), it
checks: same epoch, still the home, seqs that follow; a refusal means the store lost the session
or another node took it, and the log reports it `lost`. An ``ack`` (`RedisEventLog.trim`) trims
the memory at once and Redis with the next write.

`read_after` is the other side: any node reads a session's events after a seq straight from
Redis, exactly or not at all (``None``: the stream no longer holds all of them, the session is
unknown, or it holds fewer events than the client says it has seen).

The writer retries a batch Redis did not answer (the script makes a retry of an applied batch a
no-op), so events are never written twice or out of order. It never decides what a lost session
means for the client: `server.cluster.sessions` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, NamedTuple

import orjson
from pydantic import TypeAdapter
from redis.exceptions import NoScriptError, RedisError

from protocol.codec import encode, encode_delta
from protocol.errors import SluiceError
from protocol.eventlog import LogBudget, MemoryEventLog
from protocol.messages import Classification, Delta, Done, Embedding, Error, LoggedMessage
from server.cluster.redis import RedisStore, bulk, raise_if_cancelled
from server.cluster.scripts import log_key, meta_key, subs_key

if TYPE_CHECKING:
    from server.cluster.logbound import RedisShare

__all__ = [
    "DELTA_HEAD",
    "SEQ_FIELD",
    "WRITE_INTERVAL_S",
    "WRITE_WINDOW_S",
    "Framed",
    "LogWriter",
    "RedisEventLog",
    "decode_event",
    "framed",
    "read_after",
]

log = logging.getLogger("sluice.cluster.eventlog")

# After a failed write, wait this long before the next try (Redis is down or restarting).
RETRY_AFTER_S = 0.25
# How long the first event of a quiet moment waits for others to share its round trip.
WRITE_WINDOW_S = 0.001
# The least time from the start of one write to the start of the next.
WRITE_INTERVAL_S = 0.002
# How long past that interval a write waits for an event to start it before a timer does.
WRITE_LATE_S = 0.001

_ADAPTER: TypeAdapter[LoggedMessage] = TypeAdapter(LoggedMessage)
_EVALSHA = bulk(b"EVALSHA")
_ZERO, _ONE = bulk(b"0"), bulk(b"1")
# A number argument, zero-padded to one width so that it is one format with no length to compute
# (the script reads every number with ``tonumber``).
_NUMBER = b"$20\r\n%020d\r\n"
# A log's arguments when it has only new events: id and epoch (packed), first seq, the oldest to
# keep, no ack, no release, no request started or ended, the count of events (then the events).
_EVENTS_ONLY = b"%b" + _NUMBER * 2 + _ZERO * 4 + _NUMBER
# A session's arguments to `scripts.APPEND` besides its requests and events: id, epoch, first,
# keep, acked, release, and the three counts.
_FIXED_ARGS = 9


def decode_event(data: bytes | str) -> LoggedMessage:
    """A logged event from the JSON `protocol.codec.encode` wrote (a delta takes a fast path:
    its constructor, which costs less than `model_construct` or the union's adapter)."""
    fields = orjson.loads(data)
    if fields.get("type") == "delta":
        return Delta(id=fields["id"], seq=fields["seq"], text=fields["text"])
    return _ADAPTER.validate_python(fields)


class Framed(NamedTuple):
    """A delta as the JSON `protocol.codec.encode` wrote, which is the text frame a WebSocket
    client is sent, with its seq read off it: what a relay need not decode (`framed`), and what
    the home keeps of a delta it logged (`RedisEventLog.append_delta`)."""

    seq: int
    frame: str

    def event(self) -> LoggedMessage:
        return decode_event(self.frame)


# How a logged delta's JSON begins, and the field its seq follows (`framed`).
DELTA_HEAD = b'{"type":"delta",'
SEQ_FIELD = b',"seq":'


def framed(line: bytes) -> LoggedMessage | Framed:
    """A logged event's JSON: a delta as it is (`Framed`), anything else decoded. A delta's seq
    follows its id, a JSON string, which cannot hold an unescaped quote: the first ``,"seq":`` is
    the field."""
    if line.startswith(DELTA_HEAD):
        at = line.find(SEQ_FIELD) + len(SEQ_FIELD)
        return Framed(int(line[at : line.index(b",", at)]), line.decode())
    return decode_event(line)


def _terminal_id(event: LoggedMessage) -> str | None:
    if isinstance(event, Done | Embedding | Classification) or (isinstance(event, Error) and event.id):
        return event.id
    return None


class _Taken(NamedTuple):
    """How much of a log's pending state one write carries."""

    events: int
    started: int
    ended: int
    release: bool
    acked: int


class RedisEventLog:
    """One session's `EventLog` on its home node: memory for replay, Redis for every other node."""

    __slots__ = (
        "_acked",
        "_bytes",
        "_capacity",
        "_ended",
        "_holds",
        "_last",
        "_max_bytes",
        "_pending",
        "_pending_events",
        "_pending_first",
        "_sizes",
        "_started",
        "_trimmed",
        "epoch",
        "keys",
        "lost",
        "memory",
        "on_idle",
        "on_lost",
        "on_written",
        "packed",
        "release",
        "session_id",
        "share",
        "writer",
    )

    def __init__(
        self,
        session_id: str,
        epoch: str,
        *,
        capacity: int,
        max_bytes: int = 0,
        writer: LogWriter,
        past: Iterable[LoggedMessage] = (),
        last_seq: int = 0,
        budget: LogBudget | None = None,
    ) -> None:
        self.session_id = session_id
        self.epoch = epoch
        self.writer = writer
        self._capacity = capacity
        self._max_bytes = max_bytes
        # The window Redis keeps (each write trims below it): at least `capacity` events and at
        # least `max_bytes` of their JSON, whichever is more (PROTOCOL.md §2); here the size of
        # each of its events, oldest first, tracked apart from what memory holds.
        self._sizes: deque[int] = deque()
        self._bytes = 0
        past = list(past)
        if past and past[-1].seq != last_seq:
            raise ValueError("the past events must end at last_seq")
        # The home's copy of the window, replayed with no Redis read; the node's `LogBudget`
        # may shed it (detached sessions' first), then a replay reads Redis (`read_after`).
        self.memory = MemoryEventLog(
            capacity, max_bytes=max_bytes, budget=budget, last_seq=last_seq - len(past)
        )
        for event in past:
            self.memory.append(event)
            self._sizes.append(len(encode(event)))
        self._bytes = sum(self._sizes)
        self._evict()
        self._last = last_seq
        # Not yet written to Redis: the JSON of seqs _pending_first.. (each a RESP bulk string,
        # as the write sends it) and those events (a delta as its frame), request ids started and
        # ended, and the oldest seq not acknowledged (0: no ack to write).
        self._pending: list[bytes] = []
        self._pending_events: list[LoggedMessage | Framed] = []
        self._pending_first = last_seq + 1
        self._started: list[str] = []
        self._ended: list[str] = []
        self._acked = 0
        # The oldest seq not acknowledged, as last handed to the writer.
        self._trimmed = 0
        self.release = False
        self.lost = False
        self._holds = 0
        self.on_lost: Callable[[RedisEventLog], None] | None = None
        # Events now in Redis, in seq order: what the home may send to a transport it holds.
        self.on_written: Callable[[list[LoggedMessage | Framed]], None] | None = None
        # Every event appended so far is in Redis (after a write that left nothing pending).
        self.on_idle: Callable[[], None] | None = None
        # This log's share of the node's bound on what its logs hold in Redis, if there is one.
        self.share: RedisShare | None = None
        # What never changes in this log's part of a write: its keys, and its id and epoch.
        self.keys = b"".join(bulk(key(session_id).encode()) for key in (meta_key, log_key, subs_key))
        self.packed = bulk(session_id.encode()) + bulk(epoch.encode())

    # -- EventLog ----------------------------------------------------------------------------

    @property
    def last_seq(self) -> int:
        return self._last

    @property
    def oldest_seq(self) -> int:
        return self.memory.oldest_seq

    def __len__(self) -> int:
        return len(self.memory)

    def append(self, event: LoggedMessage) -> None:
        if type(event) is Delta:
            self.append_delta(event.id, event.seq, event.text)
            return
        self.memory.append(event)  # first: it refuses a seq that does not follow
        self._pend(encode(event), event.seq, event)
        terminal = _terminal_id(event)
        if terminal is not None:
            self._ended.append(terminal)
        self.writer.dirty(self)

    def append_delta(self, request_id: str, seq: int, text: str) -> None:
        """`append` of ``Delta(id=request_id, seq=seq, text=text)`` from its fields (the session's
        hot path, once per token): no model is built; its JSON, encoded once, is what Redis logs
        and the frame the home's transport is sent (`Framed`)."""
        self.memory.append_delta(request_id, seq, text)  # first: it refuses a seq that does not follow
        frame = encode_delta(request_id, seq, text)
        # `_pend`, inlined: this runs once per token.
        size = len(frame)
        self._sizes.append(size)
        self._bytes += size
        self._last = seq
        data = frame.encode()
        self._pending.append(b"$%d\r\n%b\r\n" % (len(data), data))
        self._pending_events.append(Framed(seq, frame))
        if len(self._sizes) > self._capacity:
            self._evict()
        self.writer.dirty(self)

    def _pend(self, frame: str, seq: int, event: LoggedMessage | Framed) -> None:
        size = len(frame)
        self._sizes.append(size)
        self._bytes += size
        self._last = seq
        self._pending.append(bulk(frame.encode()))
        self._pending_events.append(event)
        if len(self._sizes) > self._capacity:
            self._evict()

    def _evict(self) -> None:
        sizes = self._sizes
        while len(sizes) > self._capacity and self._bytes - sizes[0] >= self._max_bytes:
            self._bytes -= sizes.popleft()

    def after(self, seq: int) -> list[LoggedMessage] | None:
        return self.memory.after(seq)

    def trim(self, upto: int) -> None:
        """The client has every event up to ``upto``: they go from memory now, and from Redis
        with the next write (so a resume below it is answered as from this memory, on any node)."""
        self.memory.trim(upto)
        sizes = self._sizes
        drop = min(upto, self._last) - (self._last - len(sizes))
        for _ in range(min(drop, len(sizes))):
            self._bytes -= sizes.popleft()
        keep = min(upto, self._last) + 1
        if keep > max(self._trimmed, 1):
            self._trimmed = self._acked = keep
            self.writer.dirty(self)

    # -- what the writer needs ---------------------------------------------------------------

    def started(self, request_id: str) -> None:
        """A request began on this home: recorded so survivors can end it if this node dies."""
        self._started.append(request_id)
        self.writer.dirty(self)

    def let_go(self) -> None:
        """This node stops being the session's home once what is pending is written."""
        self.release = True
        self.writer.dirty(self)

    def hold(self) -> None:
        """Write nothing more until as many `unhold` (the home writes something else first)."""
        self._holds += 1

    def unhold(self) -> None:
        self._holds -= 1
        if not self._holds:
            self.writer.dirty(self)

    def take_batch(self) -> tuple[_Taken, int, bytes] | None:
        """What is pending, and this log's arguments to `scripts.APPEND` in RESP (how many, and
        their bulk strings; its keys are `keys`); None when nothing is pending (or while held)."""
        if self._holds:
            return None
        pending, started, ended = self._pending, self._started, self._ended
        events = len(pending)
        # Redis trims below the oldest event this window holds (after an `ack`, the oldest the
        # window would hold: what the client acknowledged goes exactly, by `_acked`).
        keep_from = max(0, self._last - max(len(self._sizes), self._capacity) + 1)
        if not (started or ended or self.release or self._acked):
            if not events:
                return None
            # The usual write (new events only): its arguments in one format, each event's bulk
            # string as `append` made it.
            head = _EVENTS_ONLY % (self.packed, self._pending_first, keep_from, events)
            return _Taken(events, 0, 0, False, 0), _FIXED_ARGS + events, head + b"".join(pending)
        taken = _Taken(events, len(started), len(ended), self.release, self._acked)
        parts = [
            self.packed,
            _NUMBER % self._pending_first,
            _NUMBER % keep_from,
            _NUMBER % self._acked,
            _ONE if self.release else _ZERO,
            _NUMBER % len(started),
        ]
        parts += [bulk(request_id.encode()) for request_id in started]
        parts.append(_NUMBER % len(ended))
        parts += [bulk(request_id.encode()) for request_id in ended]
        parts.append(_NUMBER % events)
        parts += pending
        return taken, _FIXED_ARGS + len(started) + len(ended) + events, b"".join(parts)

    def written(self, taken: _Taken, last: int) -> None:
        """The batch `take_batch` gave is in Redis, ending at seq ``last``."""
        events = taken.events
        if events == len(self._pending):  # the usual case: nothing was appended meanwhile
            done = self._pending_events
            self._pending, self._pending_events = [], []
        else:
            done = self._pending_events[:events]
            del self._pending[:events]
            del self._pending_events[:events]
        if taken.started:
            del self._started[: taken.started]
        if taken.ended:
            del self._ended[: taken.ended]
        self._pending_first = last + 1
        if taken.release:
            self.release = False
        if self._acked == taken.acked:
            self._acked = 0
        if self.share is not None:
            self.share.written()
        if done and self.on_written is not None:
            self.on_written(done)
        if done and not self._pending and self.on_idle is not None:
            self.on_idle()

    @property
    def window(self) -> tuple[deque[int], int]:
        """The sizes of the events Redis's window holds, oldest first, and their sum."""
        return self._sizes, self._bytes

    @property
    def writing(self) -> bool:
        """Whether some appended events are not yet known to be in Redis."""
        return bool(self._pending)

    @property
    def written_seq(self) -> int:
        """Seq of the newest event known to be in Redis."""
        return self._pending_first - 1

    def mark_lost(self) -> None:
        self.lost = True
        self._pending.clear()
        self._pending_events.clear()
        self._started.clear()
        self._ended.clear()
        self._acked = 0
        if self.on_lost is not None:
            self.on_lost(self)


def _settle(due: asyncio.Future[None]) -> None:
    if not due.done():
        due.set_result(None)


class LogWriter:
    """Writes every dirty `RedisEventLog` of this node: one `scripts.APPEND` call per round trip."""

    def __init__(self, store: RedisStore, node_id: str, *, ttl_ms: int) -> None:
        self._store = store
        self._node_id = node_id
        # The logs with something to write (a log is its own key: hashed by identity).
        self._dirty: dict[RedisEventLog, None] = {}
        self._scheduled = False
        self._task: asyncio.Task[None] | None = None
        self._last_start = 0.0
        # While the write burst waits out the interval: what starts its next write.
        self._due: asyncio.Future[None] | None = None

        self.round_trips = 0
        # The call's arguments that never change: this node and the keys' ttl.
        self._node_args = bulk(node_id.encode()) + bulk(b"%d" % ttl_ms)

    def dirty(self, event_log: RedisEventLog) -> None:
        if event_log.lost:
            return
        self._dirty[event_log] = None
        due = self._due
        if due is not None:
            # The burst waits out the interval: once it is over, this event starts the write
            # (no timer of its own to wake the loop for, under load).
            if not due.done() and due.get_loop().time() >= self._last_start + WRITE_INTERVAL_S:
                due.set_result(None)
        elif not self._scheduled and self._task is None:
            self._scheduled = True
            asyncio.get_running_loop().call_later(WRITE_WINDOW_S, self._start)

    def _start(self) -> None:
        self._scheduled = False
        if self._task is None and self._dirty:
            self._task = asyncio.create_task(self._write_all(), name="sluice redis log writer")

    async def _write_all(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._dirty:
                # Back-to-back writes start at least WRITE_INTERVAL_S apart, so a busy node
                # sends fewer, larger batches (and its sessions merge more tokens per event):
                # the first event appended after the interval starts the next one, or, when none
                # comes, a timer WRITE_LATE_S after it.
                wait = self._last_start + WRITE_INTERVAL_S - loop.time()
                if wait > 0:
                    due = self._due = loop.create_future()
                    timer = loop.call_later(wait + WRITE_LATE_S, _settle, due)
                    try:
                        await due
                    finally:
                        self._due = None
                        timer.cancel()
                self._last_start = loop.time()
                logs = list(self._dirty)
                self._dirty.clear()
                if not await self._write(logs):
                    for event_log in logs:
                        self._dirty.setdefault(event_log)
                    raise_if_cancelled()
                    await asyncio.sleep(RETRY_AFTER_S)
        finally:
            self._task = None

    async def _write(self, logs: list[RedisEventLog]) -> bool:
        """One round trip: one `scripts.APPEND` call (packed here) for every log of ``logs`` with
        something pending; False when it must be tried again."""
        store = self._store
        batches: list[tuple[RedisEventLog, _Taken]] = []
        keys: list[bytes] = []
        args: list[bytes] = []
        count = 0
        for event_log in logs:
            batch = event_log.take_batch() if not event_log.lost else None
            if batch is None:
                continue
            taken, argc, packed = batch
            batches.append((event_log, taken))
            keys.append(event_log.keys)
            args.append(packed)
            count += argc
        if not batches:
            return True
        numkeys = 3 * len(batches)
        sha = store.append_script.sha.encode()
        # EVALSHA, sha, numkeys, the keys, node, ttl, then each log's arguments.
        command = b"*%d\r\n%b%b%b%b%b%b" % (
            5 + numkeys + count,
            _EVALSHA,
            bulk(sha),
            bulk(b"%d" % numkeys),
            b"".join(keys),
            self._node_args,
            b"".join(args),
        )
        try:
            (reply,) = await store.round_trip([command])
        except (RedisError, OSError, TimeoutError) as exc:  # a lost connection: all tried again
            store.mark_down(type(exc).__name__)
            return False
        if isinstance(reply, Exception):
            if isinstance(reply, NoScriptError):  # Redis restarted: its script cache is empty
                with contextlib.suppress(SluiceError):  # still down: the next try loads them
                    await store.load_scripts()
            else:
                log.warning("session store refused a write: %s", reply)
            return False
        self.round_trips += 1
        for (event_log, taken), last in zip(batches, reply, strict=True):
            if last < 0:
                log.warning(
                    "session store refused a write (%d): the session is lost",
                    last,
                    extra={"session": event_log.session_id},
                )
                event_log.mark_lost()
            else:
                event_log.written(taken, last)
        return True

    async def flush(self) -> None:
        """Wait until everything appended so far is written (or given up as lost)."""
        while self._dirty or self._task is not None or self._scheduled:
            task = self._task
            if task is not None:
                await asyncio.shield(task)
            else:
                await asyncio.sleep(0)


async def read_after(store: RedisStore, session_id: str, last_seq: int) -> list[LoggedMessage] | None:
    """Every event of ``session_id`` with ``seq > last_seq``, read from Redis: exactly all of them
    or None (unknown session, events no longer held, or a ``last_seq`` the store never reached)."""
    async with store.translated():
        pipe = store.client.pipeline(transaction=True)
        pipe.hget(meta_key(session_id), "seq")
        pipe.xrange(log_key(session_id), min=f"{last_seq + 1}-0", max="+")
        seq_raw, entries = await pipe.execute()
    if seq_raw is None:
        return None
    return exact_after(int(seq_raw), last_seq, entries)


def exact_after(
    top: int, last_seq: int, entries: list[tuple[bytes, dict[bytes, bytes]]]
) -> list[LoggedMessage] | None:
    """The events of ``entries`` (XRANGE from ``last_seq + 1``) if they are exactly seqs
    ``last_seq + 1 .. top``; None otherwise."""
    if last_seq < 0 or last_seq > top:
        return None
    events = [decode_event(fields[b"m"]) for _, fields in entries]
    expected = last_seq + 1
    for event in events:
        if event.seq != expected:
            return None
        expected += 1
    if expected != top + 1:
        return None
    return events
