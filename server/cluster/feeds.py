"""Which sessions' feeds reach this node: its membership of their ``subs`` sets in Redis.

A node joins a session's ``subs`` (`server.cluster.homes.listen`) before it reads the log for a
transport attaching here, and leaves it once no transport of the session is here any more. The
joins and leaves of one session run one at a time, in the order they were asked for, and a leave
first checks that no transport came back meanwhile: a leave that raced a new attach must never
land in Redis after that attach's join, or the home would stop publishing to a node that holds
the transport.

This module only keeps that membership; what the feed carries is `server.cluster.session`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from server.cluster import homes
from server.cluster.redis import RedisStore

__all__ = ["Feeds"]


class Feeds:
    """See the module docstring."""

    def __init__(self, store: RedisStore, node_id: str, *, ttl_ms: int) -> None:
        self._store = store
        self._node_id = node_id
        self._ttl_ms = ttl_ms
        self._joined: set[str] = set()
        # Per session: its lock and how many joins and leaves hold it or wait for it.
        self._turns: dict[str, tuple[asyncio.Lock, list[int]]] = {}

    async def join(self, session_id: str) -> None:
        """From when this returns the session's feed reaches this node."""
        async with self._turn(session_id):
            if session_id not in self._joined:
                await homes.listen(self._store, session_id, self._node_id, ttl_ms=self._ttl_ms)
                self._joined.add(session_id)

    async def leave(self, session_id: str, wanted: Callable[[], bool]) -> None:
        """Stop the session's feed reaching this node, unless ``wanted()`` says, by then, that a
        transport of it is here again."""
        async with self._turn(session_id):
            if session_id in self._joined and not wanted():
                self._joined.discard(session_id)
                await homes.unlisten(self._store, session_id, self._node_id)

    def dropped(self, session_id: str) -> None:
        """The session's keys are gone (ended): nothing left to leave."""
        self._joined.discard(session_id)

    @contextlib.asynccontextmanager
    async def _turn(self, session_id: str) -> AsyncIterator[None]:
        turn = self._turns.get(session_id)
        if turn is None:
            turn = self._turns[session_id] = (asyncio.Lock(), [0])
        lock, holders = turn
        holders[0] += 1
        try:
            async with lock:
                yield
        finally:
            holders[0] -= 1
            if not holders[0]:
                del self._turns[session_id]
