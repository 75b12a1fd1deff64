"""Per-key limits counted across a cluster (``SLUICE_REDIS_URL``): the counts live in Redis,
every decision is made from a local view of them.

`SharedCounts` is what `server.ratelimit.RateLimiter` consults in cluster mode. For each key this
node has seen within a window it holds what Redis said at the last sync (requests left in the
moving window, tokens left in the fixed window) and what this node has done since (`pending`);
for every key, the sessions open on the other nodes. `RateLimiter` decides from
``view - pending`` synchronously, so no request ever waits on a Redis round trip; a background
task syncs every ``interval_s``: it adds this node's pending hits to the shared windows (the
``limits`` library's strategies on its async Redis storage, redis-py underneath), reads the
windows back, and publishes this node's open sessions per key (a hash per node, expiring unless
refreshed, so a dead node's sessions stop counting by themselves).

What that costs: a key's limit can be overrun by what the other nodes admit within one sync
interval (50 ms by default) before they hear of each other, never more (requests and tokens of
a key new to a node are counted by that node alone until its first sync of it). A node that dies
takes its count of open sessions with it after ``_NODE_TTL_S``, while those sessions may live on
elsewhere (the count then errs on the side of admitting). Each node publishes the sessions
opened minus those ended on it, so a session opened on one node and ended on another (it moved)
leaves the cluster's sum right while both nodes live. While Redis is unreachable, pending hits
gather and count against the view (so limits tighten, never loosen) and are added once Redis is
back. This module never refuses anything itself and never blocks the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from limits import RateLimitItem
from limits.aio.strategies import FixedWindowRateLimiter, MovingWindowRateLimiter
from limits.storage import storage_from_string

__all__ = ["SharedCounts", "View"]

log = logging.getLogger("sluice.sharedlimits")

SYNC_INTERVAL_S = 0.05
# A node's published session counts expire this long after its last sync.
_NODE_TTL_S = 10.0
_PREFIX = "sluice:limits"
_NODES_KEY = f"{_PREFIX}:nodes"


def _sessions_key(node_id: str) -> str:
    return f"{_PREFIX}:sessions:{node_id}"


@dataclass(slots=True)
class View:
    """One key's counts: the cluster's as of the last sync, and this node's since."""

    requests_left: int | None = None  # None: not synced yet (only this node's hits are known)
    requests_reset: float = 0.0
    tokens_left: int | None = None
    tokens_reset: float = 0.0
    pending_requests: int = 0
    pending_tokens: int = 0
    seen: float = 0.0


class SharedCounts:
    """The cluster-wide counts of `RateLimiter`'s limits; see the module docstring."""

    def __init__(
        self,
        url: str,
        *,
        requests: RateLimitItem | None,
        tokens: RateLimitItem | None,
        count_sessions: bool,
        window_s: int,
        node_id: str | None = None,
        interval_s: float = SYNC_INTERVAL_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        import redis.asyncio  # cluster mode only

        self.node_id = node_id or secrets.token_hex(6)
        self._requests = requests
        self._tokens = tokens
        self._count_sessions = count_sessions
        self._window_s = window_s
        self._interval_s = interval_s
        self._clock = clock
        storage_url = url.replace("redis://", "async+redis://", 1).replace("rediss://", "async+rediss://", 1)
        self._storage = storage_from_string(
            storage_url, implementation="redispy", key_prefix=_PREFIX, socket_timeout=2.0
        )
        self._moving = MovingWindowRateLimiter(self._storage)
        self._fixed = FixedWindowRateLimiter(self._storage)
        self._redis = redis.asyncio.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
        self._views: dict[str, View] = {}
        self._sessions: dict[str, int] = {}
        self._published: set[str] = set()  # the keys of this node's hash in Redis
        # Sessions per key open on the other nodes, as of the last sync (signed: a session that
        # moved is counted +1 where it opened and -1 where it ended).
        self._other_sessions: dict[str, int] = {}
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._failing = False
        self.syncs = 0

    # -- the local view (synchronous, no I/O) --------------------------------------------------

    def view(self, key_id: str) -> View:
        view = self._views.get(key_id)
        if view is None:
            view = self._views[key_id] = View()
        view.seen = self._clock()
        self._ensure_task()
        return view

    def sessions(self, key_id: str) -> int:
        """Sessions of ``key_id`` open in the cluster: this node's (opened minus ended here) plus
        the other nodes' as of the last sync."""
        self.view(key_id)
        return max(0, self._sessions.get(key_id, 0) + self._other_sessions.get(key_id, 0))

    def session_opened(self, key_id: str) -> None:
        self._sessions[key_id] = self._sessions.get(key_id, 0) + 1
        self.view(key_id)

    def session_closed(self, key_id: str) -> None:
        # Signed: a session opened on another node may end here; the cluster's sum stays right.
        count = self._sessions.get(key_id, 0) - 1
        if count:
            self._sessions[key_id] = count
        else:
            self._sessions.pop(key_id, None)

    def _ensure_task(self) -> None:
        if self._task is None and not self._closed:
            with contextlib.suppress(RuntimeError):  # no running loop: the next call on one starts it
                self._task = asyncio.get_running_loop().create_task(
                    self._sync_forever(), name="sluice shared limits"
                )

    # -- syncing -------------------------------------------------------------------------------

    async def _sync_forever(self) -> None:
        while not self._closed:
            try:
                await self.sync()
                if self._failing:
                    log.info("shared limits: Redis reachable again")
                self._failing = False
            except Exception as exc:  # Redis down or restarting: keep the view, try again
                if not self._failing:
                    log.warning("shared limits: cannot sync with Redis (%s)", type(exc).__name__)
                self._failing = True
            await asyncio.sleep(self._interval_s)

    async def sync(self) -> None:
        """One exchange with Redis: add what this node did, read back what the cluster did."""
        now = self._clock()
        for key_id in [k for k, v in self._views.items() if now - v.seen > 2 * self._window_s]:
            if not self._views[key_id].pending_requests and not self._views[key_id].pending_tokens:
                del self._views[key_id]
        keys = list(self._views)
        await asyncio.gather(*(self._sync_key(key_id) for key_id in keys))
        if self._count_sessions:
            await self._sync_sessions(now)
        self.syncs += 1

    async def _sync_key(self, key_id: str) -> None:
        view = self._views[key_id]
        if self._requests is not None:
            pending, view.pending_requests = view.pending_requests, 0
            try:
                if pending and not await self._moving.hit(self._requests, key_id, cost=pending):
                    # The window is full: record what still fits (the rest was admitted anyway).
                    stats = await self._moving.get_window_stats(self._requests, key_id)
                    if stats.remaining > 0:
                        await self._moving.hit(self._requests, key_id, cost=stats.remaining)
                stats = await self._moving.get_window_stats(self._requests, key_id)
            except BaseException:
                view.pending_requests += pending
                raise
            view.requests_left, view.requests_reset = stats.remaining, stats.reset_time
        if self._tokens is not None:
            pending, view.pending_tokens = view.pending_tokens, 0
            try:
                if pending:
                    await self._fixed.hit(self._tokens, key_id, cost=pending)
                stats = await self._fixed.get_window_stats(self._tokens, key_id)
            except BaseException:
                view.pending_tokens += pending
                raise
            view.tokens_left, view.tokens_reset = stats.remaining, stats.reset_time

    async def _sync_sessions(self, now: float) -> None:
        mine = _sessions_key(self.node_id)
        # No transaction (the keys may live on different Redis Cluster slots) and no DEL first
        # (a reader in between would see no sessions at all): set what is counted, drop what
        # no longer is.
        pipe = self._redis.pipeline(transaction=False)
        gone = self._published - self._sessions.keys()
        if gone:
            pipe.hdel(mine, *gone)
        if self._sessions:
            pipe.hset(mine, mapping=dict(self._sessions))  # type: ignore[arg-type]
        published = set(self._sessions)
        pipe.pexpire(mine, int(_NODE_TTL_S * 1000))
        pipe.zadd(_NODES_KEY, {self.node_id: now})
        pipe.zremrangebyscore(_NODES_KEY, "-inf", now - _NODE_TTL_S)
        pipe.zrange(_NODES_KEY, 0, -1)
        replies = await pipe.execute()
        self._published = published
        others = [n.decode() for n in replies[-1] if n.decode() != self.node_id]
        # Every key the other nodes count, not only the keys seen here: a key's first session on
        # this node is then judged against the whole cluster too.
        totals: dict[str, int] = {}
        if others:
            read = self._redis.pipeline(transaction=False)
            for node in others:
                read.hgetall(_sessions_key(node))
            for counts in await read.execute():
                for key_id, count in counts.items():
                    name = key_id.decode()
                    totals[name] = totals.get(name, 0) + int(count)
        self._other_sessions = totals

    async def close(self) -> None:
        """Stop syncing and close the Redis connections (this node's session counts expire)."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(Exception):
            await self._redis.aclose()
        storage_client = getattr(getattr(self._storage, "bridge", None), "storage", None)
        close = getattr(storage_client, "aclose", None)
        if close is not None:
            with contextlib.suppress(Exception):
                await close()
