"""The Redis-backed event log: what a session's home node logs, written through to Redis.

`RedisEventLog` is the `protocol.eventlog.EventLog` a cluster-mode session is built with. It
keeps the events in memory, in a `MemoryEventLog` (the home replays from there, with no await)
that shares the node's `LogBudget` with every other session homed there, so that the budget may
shed it (it tracks Redis's window apart, so a shed copy never shortens what Redis keeps; a replay
it can no longer serve reads Redis), and hands each appended event to the node's `LogWriter`, which writes every session's new
events together: the first event of a quiet moment waits `WRITE_WINDOW_S` for others, then one
`scripts.APPEND` per session that changed goes out, all in one round trip, never one per token
(packed here, what never changes for a session packed once, and written with one call on the
store's own connection: `RedisStore.round_trip`). What a write confirmed is published in the next
one, once per node that holds a transport of any of those sessions (one payload per node, every
session's events in it: `server.cluster.scripts`), never before Redis logged it. While a write is in flight the next events
gather, and the next write starts no sooner than `WRITE_INTERVAL_S` after the last one started,
so a slow Redis or a busy node means larger batches, not more round trips. The home sends a transport
only what a write confirmed (`RedisEventLog.on_written`), so no client ever has an event that a
node's death could lose. The append script numbers nothing (the session did), it checks: same
epoch, still the home, seqs that follow; a refusal means the store lost the session or another
node took it, and the log reports it `lost`.

`read_after` is the other side: any node reads a session's events after a seq straight from
Redis, exactly or not at all (``None``: the stream no longer holds all of them, the session is
unknown, or it holds fewer events than the client says it has seen).

The writer retries a batch Redis did not answer (the script makes a retry of an applied batch a
no-op), so events are never written twice or out of order. It never decides what a lost session
means for the client: `server.cluster.sessions` does.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import orjson
from pydantic import TypeAdapter
from redis.exceptions import NoScriptError, RedisError

from protocol.codec import encode
from protocol.eventlog import LogBudget, MemoryEventLog
from protocol.messages import Classification, Delta, Done, Embedding, Error, LoggedMessage
from server.cluster.redis import RedisStore, bulk, pack
from server.cluster.scripts import log_key, meta_key, node_feed_channel, subs_key

__all__ = ["WRITE_INTERVAL_S", "WRITE_WINDOW_S", "LogWriter", "RedisEventLog", "decode_event", "read_after"]

log = logging.getLogger("sluice.cluster.eventlog")

# After a failed write, wait this long before the next try (Redis is down or restarting).
RETRY_AFTER_S = 0.25
# How long the first event of a quiet moment waits for others to share its round trip.
WRITE_WINDOW_S = 0.001
# The least time from the start of one write to the start of the next.
WRITE_INTERVAL_S = 0.002

_ADAPTER: TypeAdapter[LoggedMessage] = TypeAdapter(LoggedMessage)
_PUBLISH = bulk(b"PUBLISH")


def _raw(arg: bytes | str | int) -> bytes:
    if isinstance(arg, bytes):
        return arg
    return arg.encode() if isinstance(arg, str) else b"%d" % arg


def decode_event(data: bytes | str) -> LoggedMessage:
    """A logged event from the JSON `protocol.codec.encode` wrote (a delta takes a fast path:
    its constructor, which costs less than `model_construct` or the union's adapter)."""
    fields = orjson.loads(data)
    if fields.get("type") == "delta":
        return Delta(id=fields["id"], seq=fields["seq"], text=fields["text"])
    return _ADAPTER.validate_python(fields)


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


class RedisEventLog:
    """One session's `EventLog` on its home node: memory for replay, Redis for every other node."""

    __slots__ = (
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
        "epoch",
        "feed_head",
        "lost",
        "memory",
        "on_idle",
        "on_lost",
        "on_written",
        "packed",
        "release",
        "session_id",
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
        # Not yet written to Redis: JSON of seqs _pending_first.., request ids started and ended.
        self._pending: list[bytes] = []
        self._pending_events: list[LoggedMessage] = []
        self._pending_first = last_seq + 1
        self._started: list[str] = []
        self._ended: list[str] = []
        self.release = False
        self.lost = False
        self._holds = 0
        self.on_lost: Callable[[RedisEventLog], None] | None = None
        # Events now in Redis, in seq order: what the home may send to a transport it holds.
        self.on_written: Callable[[list[LoggedMessage]], None] | None = None
        # Every event appended so far is in Redis (after a write that left nothing pending).
        self.on_idle: Callable[[], None] | None = None
        # What the writer packed once for this log's writes (see `LogWriter._command`).
        self.packed: tuple[bytes, bytes] | None = None
        # What starts this session's run in a node's feed payload.
        self.feed_head = b"#" + session_id.encode()

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
        self.memory.append(event)  # first: it refuses a seq that does not follow
        frame = encode(event)
        self._sizes.append(len(frame))
        self._bytes += len(frame)
        self._last = event.seq
        self._pending.append(frame.encode())
        self._pending_events.append(event)
        if len(self._sizes) > self._capacity:
            self._evict()
        terminal = _terminal_id(event)
        if terminal is not None:
            self._ended.append(terminal)
        self.writer.dirty(self)

    def _evict(self) -> None:
        sizes = self._sizes
        while len(sizes) > self._capacity and self._bytes - sizes[0] >= self._max_bytes:
            self._bytes -= sizes.popleft()

    def after(self, seq: int) -> list[LoggedMessage] | None:
        return self.memory.after(seq)

    def trim(self, upto: int) -> None:
        # The memory copy; Redis keeps at least `capacity` (more than the client needs is harmless).
        self.memory.trim(upto)
        sizes = self._sizes
        drop = min(upto, self._last) - (self._last - len(sizes))
        for _ in range(min(drop, len(sizes))):
            self._bytes -= sizes.popleft()

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

    def take_batch(self) -> tuple[_Taken, list[Any]] | None:
        """What is pending, and the `scripts.APPEND` keys and arguments that write it (all but the
        node's own: node id, ttl); None when nothing is pending (or while held)."""
        if self._holds:
            return None
        if not (self._pending or self._started or self._ended or self.release):
            return None
        taken = _Taken(len(self._pending), len(self._started), len(self._ended), self.release)
        sid = self.session_id
        # Redis trims below the oldest event this window holds (after an `ack`, the oldest
        # the window would hold, since Redis keeps what the client acknowledged).
        keep_from = self._last - max(len(self._sizes), self._capacity) + 1
        args: list[Any] = [meta_key(sid), log_key(sid), subs_key(sid), self.epoch, self._pending_first]
        args += [max(0, keep_from), sid, "1" if self.release else "0"]
        args += [taken.started, *self._started, taken.ended, *self._ended, *self._pending]
        return taken, args

    def written(self, taken: _Taken, last: int) -> None:
        """The batch `take_batch` gave is in Redis, ending at seq ``last``."""
        del self._pending[: taken.events]
        done = self._pending_events[: taken.events]
        del self._pending_events[: taken.events]
        del self._started[: taken.started]
        del self._ended[: taken.ended]
        self._pending_first = last + 1
        if taken.release:
            self.release = False
        if done and self.on_written is not None:
            self.on_written(done)
        if done and not self._pending and self.on_idle is not None:
            self.on_idle()

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
        if self.on_lost is not None:
            self.on_lost(self)


class LogWriter:
    """Writes every dirty `RedisEventLog` of this node, one pipeline per event-loop tick."""

    def __init__(self, store: RedisStore, node_id: str, *, ttl_ms: int) -> None:
        self._store = store
        self._node_id = node_id
        self._ttl_ms = ttl_ms
        self._dirty: dict[int, RedisEventLog] = {}
        self._scheduled = False
        self._task: asyncio.Task[None] | None = None
        self._last_start = 0.0
        self.round_trips = 0
        # Confirmed events not yet published: per node id, the lines of its next feed payload.
        self._feed_out: dict[bytes, list[bytes]] = {}
        self._channels: dict[bytes, bytes] = {}
        self._self = node_id.encode()

    def dirty(self, event_log: RedisEventLog) -> None:
        if event_log.lost:
            return
        self._dirty[id(event_log)] = event_log
        if not self._scheduled and self._task is None:
            self._scheduled = True
            asyncio.get_running_loop().call_later(WRITE_WINDOW_S, self._start)

    def _start(self) -> None:
        self._scheduled = False
        if self._task is None and self._dirty:
            self._task = asyncio.create_task(self._write_all(), name="sluice redis log writer")

    async def _write_all(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._dirty or self._feed_out:
                # Back-to-back writes start at least WRITE_INTERVAL_S apart, so a busy node
                # sends fewer, larger batches (and its sessions merge more tokens per event).
                wait = self._last_start + WRITE_INTERVAL_S - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                self._last_start = loop.time()
                logs = list(self._dirty.values())
                self._dirty.clear()
                if not await self._write(logs):
                    for event_log in logs:
                        self._dirty.setdefault(id(event_log), event_log)
                    await asyncio.sleep(RETRY_AFTER_S)
        finally:
            self._task = None

    async def _write(self, logs: list[RedisEventLog]) -> bool:
        """One round trip: the feeds of what the last write confirmed (a PUBLISH per node), then
        an EVALSHA of `scripts.APPEND` per log of ``logs`` (packed here, all written at once);
        False when some of it must be tried again."""
        store = self._store
        feeds = self._feed_out
        commands = [
            pack(3, (_PUBLISH, bulk(self._channel(node)), bulk(b"\n".join(lines))))
            for node, lines in feeds.items()
        ]
        published = len(commands)
        batches: list[tuple[RedisEventLog, _Taken, list[bytes]]] = []
        for event_log in logs:
            batch = event_log.take_batch()
            if batch is None or event_log.lost:
                continue
            taken, args = batch
            commands.append(self._command(event_log, args))
            batches.append((event_log, taken, args[len(args) - taken.events :]))
        if not commands:
            return True
        try:
            replies = await store.round_trip(commands)
        except (RedisError, OSError, TimeoutError) as exc:  # a lost connection: all tried again
            store.mark_down(type(exc).__name__)
            return False
        self.round_trips += 1
        if published:
            self._feed_out = {}
        retry = False
        for (event_log, taken, frames), reply in zip(batches, replies[published:], strict=True):
            if isinstance(reply, Exception):
                retry = True
                if isinstance(reply, NoScriptError):  # Redis restarted: its script cache is empty
                    await store.load_scripts()
            elif isinstance(reply, int):
                log.warning(
                    "session store refused a write (%d): the session is lost",
                    reply,
                    extra={"session": event_log.session_id},
                )
                event_log.mark_lost()
            else:
                event_log.written(taken, int(reply[0]))
                if frames and not taken.release:  # a release published them itself
                    self._publish_later(event_log.feed_head, frames, reply[1:])
        return not retry

    def _publish_later(self, head: bytes, frames: list[bytes], nodes: list[bytes]) -> None:
        for node in nodes:
            if node != self._self:  # the home sends its own transports what it wrote
                lines = self._feed_out.setdefault(node, [])
                lines.append(head)
                lines += frames

    def _channel(self, node: bytes) -> bytes:
        channel = self._channels.get(node)
        if channel is None:
            channel = self._channels[node] = node_feed_channel(node.decode()).encode()
        return channel

    def _command(self, event_log: RedisEventLog, args: list[Any]) -> bytes:
        """The EVALSHA that writes ``args`` (from `take_batch`), in RESP. What never changes for
        a log (script, keys, node, epoch, ttl, channel) is packed once and kept on it."""
        meta, stream, subs, epoch, first, keep_from, sid, *rest = args
        head = event_log.packed
        if head is None:
            sha = self._store.append_script.sha
            fixed = ("EVALSHA", sha, "3", meta, stream, subs, self._node_id, epoch)
            head = event_log.packed = (
                b"".join(bulk(str(arg).encode()) for arg in fixed),
                bulk(str(self._ttl_ms).encode()) + bulk(sid.encode()),
            )
        parts = [head[0], bulk(b"%d" % first), bulk(b"%d" % keep_from), head[1]]
        parts += [bulk(_raw(arg)) for arg in rest]
        # EVALSHA, sha, 3, meta, log, subs, node, epoch, first, keep_from, ttl, sid, then the rest.
        return pack(12 + len(rest), parts)

    async def flush(self) -> None:
        """Wait until everything appended so far is written (or given up as lost)."""
        while self._dirty or self._feed_out or self._task is not None or self._scheduled:
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
