"""A session's ``history: true`` conversation kept in Redis, so that a new home goes on from it.

The home keeps the conversation in memory, in its `protocol.session.Session` (bounded there by
``history_messages``). Each time a turn completes (a ``done`` of a ``history: true`` generation
was just logged: `server.cluster.session`), `Histories.save` queues the whole conversation, as
bounded, each message with the seq of the ``done`` that completed its turn, for the session's
``hist`` key (`server.cluster.scripts.HISTORY`: written only while this node is still the home of
the same epoch, so a node that lost the session never overwrites what a newer home wrote). The
session's log holds that ``done`` back from Redis until the conversation is written, so a client
that has the ``done`` (from any node) finds its turn in the conversation of any later home.

A node that becomes the home reads the conversation back with the log (`load`): a turn whose
``done`` the log does not hold (the home died after writing the conversation but before its log
write; the request ended retryable instead) is left out, so the new home's conversation is the
turns the clients saw completed, exactly.

The queued conversations of every session go out together in one pipeline; a session's newer
one replaces its older one still waiting, so a slow or unreachable Redis means fewer writes,
never one out of order, and a write Redis did not answer is tried again. This module never
decides what a conversation keeps: the session does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence

import orjson
from pydantic import TypeAdapter, ValidationError

from protocol.errors import SluiceError
from protocol.messages import ChatMessage, Done, LoggedMessage
from server.cluster.redis import RedisStore, raise_if_cancelled
from server.cluster.scripts import HISTORY, history_key, meta_key

__all__ = ["Histories", "Turns", "load"]

log = logging.getLogger("sluice.cluster.histories")

# A session's epoch, its conversation's JSON, and the callbacks waiting for its write.
_Due = tuple[str, bytes, list[Callable[[], None]]]
# After a write Redis did not answer, wait this long before the next try.
_RETRY_AFTER_S = 0.25
# A conversation: each message with the seq of the ``done`` that completed its turn.
Turns = list[tuple[int, ChatMessage]]
_ADAPTER: TypeAdapter[Turns] = TypeAdapter(Turns)


def load(raw: bytes | None, past: Sequence[LoggedMessage], last_seq: int) -> Turns:
    """The conversation a ``hist`` key holds, less any turn whose ``done`` the log (``past``, its
    newest events, ending at ``last_seq``) does not hold; none for a missing or unreadable key."""
    if raw is None:
        return []
    try:
        turns = _ADAPTER.validate_json(raw)
    except ValidationError:
        log.warning("a session's stored conversation is unreadable: going on without it")
        return []
    oldest = past[0].seq if past else last_seq + 1
    logged = {event.seq for event in past if type(event) is Done}
    # Below the window the log kept no longer says; what is that old was logged long before.
    return [(seq, turn) for seq, turn in turns if seq < oldest or seq in logged]


def _dump(turns: Sequence[tuple[int, ChatMessage]]) -> bytes:
    return orjson.dumps([(seq, turn.model_dump(mode="json", exclude_none=True)) for seq, turn in turns])


class Histories:
    """The conversations this node, as their sessions' home, has yet to write; see the module doc."""

    def __init__(self, store: RedisStore, node_id: str, *, ttl_ms: int) -> None:
        self._store = store
        self._node_id = node_id
        self._ttl_ms = ttl_ms
        self._script = store.client.register_script(HISTORY)
        # Per session id: its epoch, its newest conversation's JSON not yet written, and who waits
        # for it (or for an older one it replaced).
        self._due: dict[str, _Due] = {}
        self._task: asyncio.Task[None] | None = None

    def save(
        self, session_id: str, epoch: str, turns: Sequence[tuple[int, ChatMessage]], then: Callable[[], None]
    ) -> None:
        """Write ``turns`` as session ``session_id``'s conversation (soon, with others), then call
        ``then`` (also when Redis refused it: this node is no longer the home)."""
        older = self._due.get(session_id)
        waiting = [*older[2], then] if older is not None else [then]
        self._due[session_id] = (epoch, _dump(turns), waiting)
        if self._task is None:
            self._task = asyncio.create_task(self._write_all(), name="sluice history writer")

    async def _write_all(self) -> None:
        try:
            while self._due:
                due, self._due = self._due, {}
                try:
                    await self._write(due)
                except SluiceError:  # Redis is down: tried again, unless a newer one came
                    for session_id, (epoch, data, waiting) in due.items():
                        newer = self._due.get(session_id)
                        if newer is None:
                            self._due[session_id] = (epoch, data, waiting)
                        else:
                            self._due[session_id] = (newer[0], newer[1], waiting + newer[2])
                    raise_if_cancelled()
                    await asyncio.sleep(_RETRY_AFTER_S)
                    continue
                for _, _, waiting in due.values():
                    for then in waiting:
                        then()
        finally:
            self._task = None

    async def _write(self, due: dict[str, _Due]) -> None:
        async with self._store.translated():
            pipe = self._store.client.pipeline(transaction=False)
            for session_id, (epoch, data, _) in due.items():
                keys = [meta_key(session_id), history_key(session_id)]
                await self._script(keys=keys, args=[self._node_id, epoch, data, self._ttl_ms], client=pipe)
            await pipe.execute()

    async def flush(self) -> None:
        """Wait until every conversation saved so far is written (or the caller gives up)."""
        while self._task is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._task)
