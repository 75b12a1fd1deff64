"""The cluster-mode session registry: every node opens, resumes, attaches and ends any session.

The same methods as the in-memory `server.sessions.SessionRegistry` (`connect`, `open_or_resume`,
`attach`, `find`, `end`, the sweeper, `close`), with the sessions in Redis: the meta hash says
who owns a session (its key), its epoch and its home node. Opening a session makes this node its
home. Resuming one reads its meta: another key's session is "no such session"; one whose home is
gone (``home`` empty, or a node without a lease) is claimed here, after its unfinished requests
were ended with a retryable ``internal`` error (`recover`, the same step every node runs for a
node whose lease expired); otherwise the transport attaches here and the home stays where it is
(`server.cluster.session` for how events and client messages travel). A resume is exact or it
is a new session (``resumed: false``): the store lost the session, or the log no longer holds
every event after ``last_seq``.

The logs of the sessions homed here share one `protocol.eventlog.LogBudget` (``max_log_bytes``)
for their in-memory copies, shed as on one node: detached sessions' first (longest detached
first), then the largest of the others. A shed event is still in Redis, within the session's
window, so a resume that needs it reads it from there (exactly, or not at all). A bound of the
same size and order holds what those sessions' logs keep in Redis (`server.cluster.logbound`).

A session's ``history: true`` conversation goes to Redis as each turn completes
(`server.cluster.histories`) and comes back with the log when a node claims the session.

A node whose lease lapsed is taken off the ``subs`` of every session it held a transport of, by
the node that reaps it (`homes.recover_node`); a node that was only stalled finds out in its next
sweep (its list of those sessions is gone) and listens to them again, reading what it missed.

The home alone decides when a session expires (no transport attached anywhere for the TTL: the
transports' nodes tell it on attach and detach) and refreshes its keys' TTL in Redis. While Redis
cannot be reached nothing new starts here: `connect` and friends raise ``upstream_unavailable``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from protocol.close import CloseCode
from protocol.errors import ErrorCode, SluiceError
from protocol.eventlog import LogBudget, MemoryEventLog
from protocol.messages import LoggedMessage, Welcome
from protocol.session import Session, SessionLimits
from server.cluster import forwarding, homes
from server.cluster.eventlog import LogWriter, RedisEventLog, read_after
from server.cluster.feeds import Feeds
from server.cluster.histories import Histories, Turns
from server.cluster.logbound import RedisBound, release
from server.cluster.node import Node
from server.cluster.redis import RedisStore, raise_if_cancelled
from server.cluster.scripts import ATTACH, MARK, ORPHAN, TAKE, UNMARK, meta_key
from server.cluster.session import ClusterSession, FeedSink, feed_runs
from server.dispatcher import Dispatcher
from server.metrics import Metrics
from server.outbox import Outbox
from server.ratelimit import RateLimiter
from server.runtime import SessionRuntime
from server.sessions import NotAttached, new_session_id, shedding_order

__all__ = ["ClusterConnected", "ClusterSessionRegistry"]

log = logging.getLogger("sluice.cluster.sessions")

_SWEEP_EVERY_S = 5.0
# A gap in a transport's feed that the log could not fill yet is read again after this long.
_GAP_RETRY_S = 0.25


@dataclass(frozen=True, slots=True)
class ClusterConnected:
    """What `ClusterSessionRegistry.connect` attached the connection to."""

    runtime: ClusterSession
    resumed: bool


def _text(raw: bytes | None) -> str:
    return raw.decode() if raw is not None else ""


class ClusterSessionRegistry:
    """The sessions this node is home of or holds a transport of; see the module docstring."""

    def __init__(
        self,
        *,
        limits: SessionLimits,
        ttl_s: float,
        dispatcher: Dispatcher,
        limiter: RateLimiter,
        metrics: Metrics,
        store: RedisStore,
        node: Node,
        clock: Callable[[], float] = time.monotonic,
        log_budget_bytes: int = 0,
    ) -> None:
        self._limits = limits
        self._ttl_s = ttl_s
        self._dispatcher = dispatcher
        self._limiter = limiter
        self._metrics = metrics
        self._store = store
        self._node = node
        self._clock = clock
        self.key_ttl_ms = int((ttl_s * 2 + 60) * 1000)
        self.writer = LogWriter(store, node.id, ttl_ms=self.key_ttl_ms)
        self._feeds = Feeds(store, node.id, ttl_ms=self.key_ttl_ms)
        self.histories = Histories(store, node.id, ttl_ms=self.key_ttl_ms)
        self._attach_script = store.client.register_script(ATTACH)
        self.mark_script = store.client.register_script(MARK)
        self.unmark_script = store.client.register_script(UNMARK)
        self.take_script = store.client.register_script(TAKE)
        self.orphan_script = store.client.register_script(ORPHAN)
        # Set once `close` began: forwarded messages are refused from then on (the sender looks
        # for the session's next home).
        self.closing = False
        self._sessions: dict[str, ClusterSession] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self.log_budget = LogBudget(log_budget_bytes, self._shedding_order) if log_budget_bytes else None
        self.redis_bound = RedisBound(log_budget_bytes, self._homed_logs) if log_budget_bytes else None
        node.on_control = self._on_control
        node.on_dead = self.recover_node
        node.on_reconnect = self._resync
        node.on_feed = self._on_feed

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self) -> Iterator[ClusterSession]:
        return iter(list(self._sessions.values()))

    @property
    def node(self) -> Node:
        return self._node

    @property
    def store(self) -> RedisStore:
        return self._store

    # -- the transports' methods -------------------------------------------------------------

    async def connect(
        self,
        outbox: Outbox,
        *,
        key_id: str,
        welcome: Callable[[str, bool, int], Welcome],
        resume: str | None = None,
        last_seq: int | None = None,
    ) -> ClusterConnected:
        """Attach ``outbox`` to session ``resume`` (replaying after ``last_seq``) or to a new one."""
        self._store.check()
        if resume is not None:
            session = await self._lookup(resume, key_id)
            if session is not None and await self._attach(
                session, outbox, last_seq or 0, lambda sid, seq: welcome(sid, True, seq)
            ):
                return ClusterConnected(session, resumed=True)
        session = await self._create(key_id)
        attached = await self._attach(session, outbox, 0, lambda sid, seq: welcome(sid, False, seq))
        assert attached, "a new session always replays from 0"
        return ClusterConnected(session, resumed=False)

    async def open_or_resume(
        self,
        *,
        key_id: str,
        welcome: Callable[[str, bool, int], Welcome],
        resume: str | None = None,
        last_seq: int | None = None,
    ) -> Welcome:
        """`connect`'s decision, attaching nothing (``POST /v1/sessions``)."""
        self._store.check()
        if resume is not None and await self._lookup(resume, key_id) is not None:
            replay = await read_after(self._store, resume, last_seq or 0)
            if replay is not None:
                return welcome(resume, True, (last_seq or 0) + len(replay))
        session = await self._create(key_id)
        return welcome(session.id, False, 0)

    async def attach(
        self, outbox: Outbox, *, session_id: str, key_id: str, last_seq: int
    ) -> ClusterSession | NotAttached:
        """Attach ``outbox`` to the existing session (an SSE stream: no welcome)."""
        self._store.check()
        session = await self._lookup(session_id, key_id)
        if session is None:
            return NotAttached.UNKNOWN
        return session if await self._attach(session, outbox, last_seq, None) else NotAttached.INCOMPLETE

    async def find(self, session_id: str, key_id: str) -> ClusterSession | None:
        """Session ``session_id`` if it exists and belongs to ``key_id``."""
        self._store.check()
        return await self._lookup(session_id, key_id)

    async def end(self, session_id: str) -> bool:
        """End the session wherever its home is, cancelling what it has in flight."""
        session = self._sessions.get(session_id)
        if session is not None and session.runtime is not None:
            await self._end_here(session)
            return True
        home = await self._store.run(self._store.client.hget(meta_key(session_id), "home"))
        if home is None:
            return False
        home = _text(home)
        if home and home != self._node.id and await self._node.alive(home):
            return bool(await self._node.call(home, {"op": "end", "s": session_id}))
        await self._delete(session_id)
        return True

    # -- finding and making homes ------------------------------------------------------------

    async def _lookup(self, session_id: str, key_id: str) -> ClusterSession | None:
        """This node's view of session ``session_id`` if it exists and belongs to ``key_id``: the
        view this node's feed reaches. A view that `_forget` dropped while this awaited Redis (its
        last transport went away meanwhile) is put back, or the one that replaced it looked up."""
        for _ in range(3):
            session = await self._lookup_once(session_id, key_id)
            if session is None or self._sessions.setdefault(session_id, session) is session:
                return session
        raise SluiceError(ErrorCode.UPSTREAM_UNAVAILABLE, "the session moved while it was looked up; retry")

    async def _lookup_once(self, session_id: str, key_id: str) -> ClusterSession | None:
        meta = await self._store.run(self._store.client.hgetall(meta_key(session_id)))
        session = self._sessions.get(session_id)
        epoch = _text(meta.get(b"epoch"))
        if session is not None and session.event_log is not None and session.event_log.epoch != epoch:
            self._lost(session)  # the store lost it (or made it anew): never resume from memory
            session = None
        if not meta or _text(meta.get(b"key")) != key_id:
            return None
        home = _text(meta.get(b"home"))
        if session is None:
            session = self._sessions[session_id] = ClusterSession(self, session_id, key_id, home)
        elif session.runtime is None:
            session.home = home
        if session.runtime is None and (home in ("", self._node.id) or not await self._node.alive(home)):
            await self.settle(session)
        return session

    async def settle(self, session: ClusterSession) -> None:
        """Make sure ``session.home`` names a live node, claiming the session when it has none."""
        async with session.lock:
            if session.runtime is not None:
                return
            home = await self._store.run(self._store.client.hget(meta_key(session.id), "home"))
            if home is None:
                session.ended = True
                return
            home = _text(home)
            if home and home != self._node.id and await self._node.alive(home):
                session.home = home
                return
            if home:
                await self.recover(session.id, home)
            await self._claim(session)

    async def _claim(self, session: ClusterSession) -> None:
        claimed = await homes.claim(self._store, session.id, self._node.id)
        if claimed is None:
            session.ended = True
        elif isinstance(claimed, str):
            session.home = claimed
        else:
            event_log = self._new_log(session.id, claimed.epoch, past=claimed.past, last_seq=claimed.last_seq)
            self._make_home(session, event_log, claimed.history)
            log.info("claimed session", extra={"session": session.id})

    async def _create(self, key_id: str) -> ClusterSession:
        self._limiter.acquire_session(key_id)
        session_id = new_session_id()
        try:
            epoch = await homes.create(
                self._store, session_id, key_id=key_id, node_id=self._node.id, ttl_ms=self.key_ttl_ms
            )
        except SluiceError:
            self._limiter.release_session(key_id)
            raise
        session = self._sessions[session_id] = ClusterSession(self, session_id, key_id, self._node.id)
        self._make_home(session, self._new_log(session_id, epoch))
        self._metrics.session_opened()
        return session

    def _new_log(
        self, session_id: str, epoch: str, *, past: list[LoggedMessage] | None = None, last_seq: int = 0
    ) -> RedisEventLog:
        limits = self._limits
        event_log = RedisEventLog(
            session_id,
            epoch,
            capacity=limits.replay_events,
            max_bytes=limits.replay_bytes,
            writer=self.writer,
            past=past or (),
            last_seq=last_seq,
            budget=self.log_budget,
        )
        return self.redis_bound.join(event_log) if self.redis_bound is not None else event_log

    def _homed_logs(self) -> Iterator[tuple[float | None, RedisEventLog]]:
        for session in self._sessions.values():
            if session.event_log is not None and session.runtime is not None:
                yield session.detached_since, session.event_log

    def _shedding_order(self) -> list[MemoryEventLog]:
        """The `LogBudget`'s order, as on one node (`shedding_order`), over the in-memory logs of
        the sessions homed here; their events stay in Redis, within each session's window."""
        return shedding_order((since, event_log.memory) for since, event_log in self._homed_logs())

    def _make_home(
        self, session: ClusterSession, event_log: RedisEventLog, turns: Turns | None = None
    ) -> None:
        session.turns = turns or []
        runtime = SessionRuntime(
            Session(session.id, self._limits, event_log, [turn for _, turn in session.turns]),
            dispatcher=self._dispatcher,
            metrics=self._metrics,
            key_id=session.key_id,
            clock=self._clock,
        )
        runtime.attach(FeedSink(event_log, session.done_logged), runtime.last_seq)
        event_log.on_lost = lambda _: self._lost(session)
        event_log.on_written = session.on_written
        session.runtime, session.event_log, session.home = runtime, event_log, self._node.id
        session.current = session.token
        session.detached_since = None if session.attached else self._clock()

    # -- attaching ---------------------------------------------------------------------------

    async def _attach(
        self,
        session: ClusterSession,
        outbox: Outbox,
        last_seq: int,
        welcome: Callable[[str, int], Welcome] | None,
    ) -> bool:
        session.begin_attach()
        try:
            # The home sends what its writes confirmed; elsewhere the feed, after the log.
            home_here = session.runtime is not None
            replay = session.written_after(last_seq) if home_here else None
            if replay is None:
                if not home_here:
                    await self._feeds.join(session.id)
                replay = await read_after(self._store, session.id, last_seq)
            # Numbered and announced before it goes live: see `server.cluster.session`.
            token = None
            if replay is not None:
                token = await homes.attach_token(self._store, self._attach_script, session.id, self._node.id)
        except BaseException:
            session.abandon_attach()
            raise
        if replay is None or token is None:
            session.abandon_attach()
            return False
        session.complete_attach(outbox, token, replay, last_seq, welcome)
        if replay:
            self._metrics.replay(len(replay))
        self._tell_home(session, {"op": "att", "t": token})
        return True

    def detached(self, session: ClusterSession, token: str | None) -> None:
        """A transport of ``session`` on this node went away."""
        self._tell_home(session, {"op": "det", "t": token})
        self._spawn(self._forget(session))

    def _tell_home(self, session: ClusterSession, message: dict[str, Any]) -> None:
        if session.runtime is not None:
            self._attachment(session, message)
        elif session.home:
            self._spawn(self._node.send(session.home, {**message, "s": session.id}))

    def _attachment(self, session: ClusterSession, message: dict[str, Any]) -> None:
        if message["op"] == "att":
            session.announced(message["t"])
        else:
            session.departed(message["t"], self._clock())

    async def _forget(self, session: ClusterSession) -> None:
        """Stop listening to a session's feed once no transport holds it here (and drop the view
        of one homed elsewhere)."""
        await asyncio.sleep(0)
        if session.attached or session.attaching or self._sessions.get(session.id) is not session:
            return
        if session.runtime is None:
            del self._sessions[session.id]
        await self._feeds.leave(session.id, lambda: self._held_here(session.id))

    def _held_here(self, session_id: str) -> bool:
        view = self._sessions.get(session_id)
        return view is not None and (view.attached or view.attaching)

    def _on_feed(self, payload: bytes) -> None:
        for session_id, lines in feed_runs(payload):
            session = self._sessions.get(session_id)
            if session is not None:
                session.on_lines(lines)

    def fill_gap(self, session: ClusterSession, after: int) -> None:
        async def fill() -> None:
            for _ in range(20):
                with contextlib.suppress(SluiceError):
                    session.gap_filled(await read_after(self._store, session.id, after))
                    return
                await asyncio.sleep(_GAP_RETRY_S)
            session.gap_filled(None)

        self._spawn(fill())

    def _resync(self) -> None:
        for session in list(self._sessions.values()):
            session.resync()

    def adopt(self, session: ClusterSession) -> None:
        """The home let go of a session whose transport is here: become its home."""
        self._spawn(self.settle(session))

    async def _on_control(self, message: dict[str, Any]) -> object:
        session = self._sessions.get(message.get("s", ""))
        home = session is not None and session.runtime is not None
        match message["op"]:
            case "msg" | "refuse" | "goaway" | "submit":
                if not home or self.closing or session is None or session.key_id != message["k"]:
                    return False  # not (or no longer) the home: the sender looks again
                return await forwarding.receive(self, session, message)
            case "att" | "det" if home and session is not None:
                self._attachment(session, message)
            case "orphans" if home and session is not None:
                return await forwarding.orphans(self, session, message["d"])
            case "end":
                return await self.end(message["s"])
            case _:
                pass
        return None

    # -- ending ------------------------------------------------------------------------------

    async def _end_here(self, session: ClusterSession) -> None:
        runtime = session.runtime
        assert runtime is not None
        self._sessions.pop(session.id, None)
        session.runtime = None
        self._limiter.release_session(session.key_id)
        self._metrics.session_closed()
        await runtime.close()
        await self.writer.flush()
        if session.event_log is not None:
            release(session.event_log)  # after close: nothing is logged any more
        if session.outbox is not None:
            session.outbox.fail(CloseCode.GOING_AWAY, "session closed")
        self._feeds.dropped(session.id)  # the delete takes every node off its feed
        with contextlib.suppress(SluiceError):
            await self._delete(session.id)

    async def _delete(self, session_id: str) -> None:
        await homes.delete(self._store, session_id, self._node.id)

    def _lost(self, session: ClusterSession) -> None:
        """The store no longer has this session as this node knew it: end it here, quietly."""
        if self._sessions.get(session.id) is session:
            del self._sessions[session.id]
        runtime, session.runtime = session.runtime, None
        if runtime is not None:
            self._limiter.release_session(session.key_id)
            self._metrics.session_closed()
            self._spawn(_close_and_release(runtime, session.event_log))
        if session.outbox is not None:
            session.outbox.fail(CloseCode.GOING_AWAY, "session lost by the session store")

    async def recover(self, session_id: str, dead: str) -> None:
        """End what ``dead``, the stopped home of ``session_id``, left unfinished there."""
        await homes.recover(self._store, session_id, dead, ttl_ms=self.key_ttl_ms)

    async def recover_node(self, dead: str) -> None:
        """Every session whose home was ``dead`` (its lease expired), and every request it
        forwarded that no home took (`forwarding.end_untaken`, apart: it may wait for homes)."""
        await homes.recover_node(self._store, dead, ttl_ms=self.key_ttl_ms)
        self._spawn(forwarding.end_untaken(self, dead, self._on_control))

    # -- sweeping and closing ----------------------------------------------------------------

    def expired(self) -> list[ClusterSession]:
        now = self._clock()
        return [
            session
            for session in self._sessions.values()
            if session.runtime is not None
            and session.detached_since is not None
            and now - session.detached_since >= self._ttl_s
        ]

    async def sweep(self) -> int:
        """End the sessions homed here with no transport for the TTL; refresh the others' keys."""
        await self._detach_the_dead()
        ended = 0
        for session in self.expired():
            log.info("session expired", extra={"session": session.id})
            await self._end_here(session)
            ended += 1
        here = [s.id for s in self._sessions.values() if s.runtime is not None]
        if not await homes.refresh(self._store, self._node.id, here, ttl_ms=self.key_ttl_ms):
            await self._listen_again()
        return ended

    async def _listen_again(self) -> None:
        """Other nodes took this one for dead (it stalled past its lease) and off every session's
        ``subs``: join them again for the transports held here, and read what was missed."""
        for session in [s for s in self._sessions.values() if s.runtime is None and s.attached]:
            log.warning("taken for dead: listening again", extra={"session": session.id})
            await homes.listen(self._store, session.id, self._node.id, ttl_ms=self.key_ttl_ms)
            session.resync()

    async def _detach_the_dead(self) -> None:
        """A transport whose node stopped never says it left: count it gone from now."""
        held: dict[str, list[ClusterSession]] = {}
        for session in self._sessions.values():
            node_id = (session.current or "").rpartition("/")[0]
            if (
                session.runtime is not None
                and session.detached_since is None
                and node_id not in ("", self._node.id)
            ):
                held.setdefault(node_id, []).append(session)
        for node_id, sessions in held.items():
            if not await self._node.alive(node_id):
                for session in sessions:
                    session.detached_since = self._clock()

    def start_sweeper(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep_forever(), name="sluice cluster sweeper")

    async def _sweep_forever(self) -> None:
        interval = max(0.05, min(_SWEEP_EVERY_S, self._ttl_s / 4))
        while True:
            await asyncio.sleep(interval)
            try:
                await self.sweep()
            except SluiceError:
                pass  # Redis is down; the store's health check says so
            except Exception:
                log.exception("session sweep failed")
            raise_if_cancelled()

    async def close(self) -> None:
        """Stop: end the requests still running here (retryable: resume elsewhere), let go of
        every session homed here so another node can take it at once, close local transports."""
        self.closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        error = SluiceError(ErrorCode.SHUTTING_DOWN, "the server shut down before this request finished")
        for session in list(self._sessions.values()):
            runtime = session.runtime
            if runtime is not None and session.event_log is not None:
                runtime.fail_all(error)
                await runtime.close()
                session.event_log.let_go()
            if session.outbox is not None:
                session.outbox.fail(CloseCode.GOING_AWAY, "server shutting down")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5.0):
                await self.histories.flush()  # first: a log may hold its done until it is written
                await self.writer.flush()
        for task in list(self._tasks):
            task.cancel()
        self._sessions.clear()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            if not isinstance(exc, SluiceError):
                log.error("cluster task failed", exc_info=exc)


async def _close_and_release(runtime: SessionRuntime, event_log: RedisEventLog | None) -> None:
    await runtime.close()
    if event_log is not None:
        release(event_log)
