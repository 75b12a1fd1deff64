"""A session's home in Redis: making one, claiming one, and ending a dead home's requests.

Each function is one step on the store, atomic where it must be (the scripts of
`server.cluster.scripts`): `create` writes a new session's meta with this node as its home;
`claim` makes this node the home of a session that has none and reads back its log and its
conversation, so the node can build the `Session` from them; `attach_token` numbers a transport attaching to it (the attach
generation, which orders takeovers across nodes) and announces it; `mark` records requests another node is about to forward to the session's home, `take`
makes them the home's own before it runs them, `unmark` takes back those it never took; `listen` and `unlisten` add
this node to the nodes a session's feed reaches and take it off again (`unlisten_node`: a dead
node off all of them); `recover` ends, in the session's log, every request a stopped
home left unfinished, the forwarded ones it took included (``error`` ``internal``,
``retryable: true``), and leaves the session without a home, fenced by that home's id so that it
happens once, and in one step with reading what is in flight (a mark taken meanwhile makes it
read again); a forwarded request the home never took stays marked, for its forwarder, and when
that forwarder stops too, `end_untaken` ends it once (`orphan` at a live home, which numbers the
error, racing `take` atomically; in the log from the survivor when there is none); `refresh`
keeps a live session's keys; `delete` forgets a session.

Nothing here keeps state or decides anything: `server.cluster.sessions` does.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, WatchError

from protocol.codec import encode
from protocol.errors import ErrorCode
from protocol.messages import Error, LoggedMessage
from server.cluster import histories
from server.cluster.eventlog import decode_event
from server.cluster.redis import RedisStore, store_unavailable
from server.cluster.scripts import (
    history_key,
    log_key,
    meta_key,
    node_marks_key,
    node_sessions_key,
    node_subs_key,
    subs_key,
)

__all__ = [
    "FORWARDER_STOPPED",
    "NODE_STOPPED",
    "Claimed",
    "attach_generation",
    "attach_token",
    "claim",
    "create",
    "delete",
    "end_untaken",
    "listen",
    "mark",
    "orphan",
    "recover",
    "recover_node",
    "refresh",
    "take",
    "unlisten",
    "unmark",
]

NODE_STOPPED = "the node running this request stopped"
FORWARDER_STOPPED = "the node that took this request stopped before the session's home had it"
# How long `end_untaken` waits before it looks at a session again (its home changed meanwhile,
# or did not answer), and how many times it looks.
_UNTAKEN_RETRY_S = 0.25
_UNTAKEN_TRIES = 5


@dataclass(frozen=True, slots=True)
class Claimed:
    """A session this node is now the home of, as the store had it."""

    epoch: str
    last_seq: int
    past: list[LoggedMessage]  # the newest events the log holds, contiguous, ending at last_seq
    history: histories.Turns  # its conversation, the turns the log completed (`histories.load`)


def _text(raw: bytes | str | None) -> str:
    if raw is None:
        return ""
    return raw.decode() if isinstance(raw, bytes) else raw


async def create(store: RedisStore, session_id: str, *, key_id: str, node_id: str, ttl_ms: int) -> str:
    """Write a new session homed at ``node_id``; its epoch."""
    epoch = secrets.token_hex(8)
    async with store.translated():
        pipe = store.client.pipeline(transaction=False)
        pipe.hset(meta_key(session_id), mapping={"key": key_id, "epoch": epoch, "seq": 0, "home": node_id})
        pipe.pexpire(meta_key(session_id), ttl_ms)
        pipe.sadd(node_sessions_key(node_id), session_id)
        await pipe.execute()
    return epoch


async def claim(store: RedisStore, session_id: str, node_id: str) -> Claimed | str | None:
    """Become the home of ``session_id`` if it has none: what it holds (its log and its
    conversation), or the node that is its home, or None when there is no such session."""
    keys = [meta_key(session_id)]
    reply = await store.run(store.claim_script(keys=keys, args=[node_id, ""], client=store.client))
    if reply is None or isinstance(reply, bytes | str):
        return _text(reply) if reply is not None else None
    epoch, last_seq = _text(reply[0]), int(reply[1])
    async with store.translated():
        pipe = store.client.pipeline(transaction=False)
        pipe.xrange(log_key(session_id), max=f"{last_seq}-0")
        pipe.sadd(node_sessions_key(node_id), session_id)
        pipe.get(history_key(session_id))
        entries, _, history = await pipe.execute()
    past = _contiguous([decode_event(fields[b"m"]) for _, fields in entries], last_seq)
    return Claimed(epoch, last_seq, past, histories.load(history, past, last_seq))


async def attach_token(store: RedisStore, script: AsyncScript, session_id: str, node_id: str) -> str | None:
    """The token of a transport attaching to ``session_id`` on ``node_id`` (``<node>/<generation>``,
    the generation one more than any transport's before), announced on the session's feed as
    ``!A <token>`` in the same step (``script`` is `server.cluster.scripts.ATTACH`); None when
    there is no such session."""
    keys = [meta_key(session_id), subs_key(session_id)]
    reply = await store.run(script(keys=keys, args=[node_id, session_id], client=store.client))
    return None if reply is None else _text(reply)


async def mark(
    store: RedisStore,
    script: AsyncScript,
    session_id: str,
    home: str,
    forward_id: str,
    request_ids: list[str],
    *,
    ttl_ms: int,
) -> list[bool] | None:
    """Before forwarding ``request_ids`` to ``home`` (``script`` is `server.cluster.scripts.MARK`):
    per id whether this forward marked it (False: one of that id is in flight already); None when
    ``home`` is not the session's home any more (nothing marked). The forwarding node (the forward
    id's ``<node>/`` prefix) notes the session in its ``marks`` first, in the same round trip, so a
    survivor finds what it left untaken if it dies (`end_untaken`)."""
    marks = node_marks_key(forward_id.partition("/")[0])
    args = [home, forward_id, *request_ids]
    async with store.translated():
        pipe = store.client.pipeline(transaction=False)
        now = time.time()
        pipe.zadd(marks, {session_id: now})
        # A forward waits seconds for its home, not the keys' ttl: entries that old are done with.
        pipe.zremrangebyscore(marks, "-inf", now - ttl_ms / 1000)
        pipe.pexpire(marks, ttl_ms)
        pipe.evalsha(script.sha, 1, meta_key(session_id), *args)
        *_, reply = await pipe.execute(raise_on_error=False)
    if isinstance(reply, NoScriptError):  # Redis restarted: running it once loads it
        reply = await store.run(script(keys=[meta_key(session_id)], args=args, client=store.client))
    elif isinstance(reply, Exception):
        raise store_unavailable() from reply
    return None if reply is None else [bool(n) for n in reply]


async def take(
    store: RedisStore,
    script: AsyncScript,
    session_id: str,
    node_id: str,
    forward_id: str,
    request_ids: list[str],
) -> list[bool] | None:
    """At the home, before running forwarded ``request_ids`` (``script`` is
    `server.cluster.scripts.TAKE`): per id whether this forward's mark became the home's; None when
    ``node_id`` is not the home any more (they must not run here)."""
    args = [node_id, forward_id, *request_ids]
    reply = await store.run(script(keys=[meta_key(session_id)], args=args, client=store.client))
    return None if reply is None else [bool(n) for n in reply]


async def unmark(
    store: RedisStore, script: AsyncScript, session_id: str, value: str, request_ids: list[str]
) -> list[bool]:
    """Take back marks still holding ``value`` (``script`` is `server.cluster.scripts.UNMARK`): a
    forward's id, for a forward the home never took (False: it took it: the request is that
    home's, run there or ended with its requests), or ``1``, for requests the home took and
    refused. Per id whether it was taken back."""
    args = [value, *request_ids]
    reply = await store.run(script(keys=[meta_key(session_id)], args=args, client=store.client))
    return [bool(n) for n in reply]


async def listen(store: RedisStore, session_id: str, node_id: str, *, ttl_ms: int) -> None:
    """From when this returns, every event the session's home writes and every notice reaches
    ``node_id``'s feed channel (published after the write, so a log read after this misses
    nothing: what it does not hold yet is published later)."""
    async with store.translated():
        pipe = store.client.pipeline(transaction=False)
        pipe.sadd(subs_key(session_id), node_id)
        pipe.pexpire(subs_key(session_id), ttl_ms)
        pipe.sadd(node_subs_key(node_id), session_id)
        pipe.pexpire(node_subs_key(node_id), ttl_ms)
        await pipe.execute()


async def unlisten(store: RedisStore, session_id: str, node_id: str) -> None:
    """``node_id`` holds no transport of the session any more: its feed need not reach it."""
    async with store.translated():
        pipe = store.client.pipeline(transaction=False)
        pipe.srem(subs_key(session_id), node_id)
        pipe.srem(node_subs_key(node_id), session_id)
        await pipe.execute()


async def unlisten_node(store: RedisStore, dead: str) -> None:
    """Take ``dead`` (its lease expired) off the ``subs`` of every session it listened to, so no
    home publishes to it any more."""
    sessions = await store.run(store.client.smembers(node_subs_key(dead)))
    async with store.translated():
        pipe = store.client.pipeline(transaction=False)
        for raw in sessions:
            pipe.srem(subs_key(_text(raw)), dead)
        pipe.delete(node_subs_key(dead))
        await pipe.execute()


def attach_generation(token: str | None) -> int:
    """The attach generation of a transport's token (0 for none): a newer transport has a higher one."""
    tail = (token or "").rpartition("/")[2]
    return int(tail) if tail.isdigit() else 0


async def recover(store: RedisStore, session_id: str, dead: str, *, ttl_ms: int) -> None:
    """End the unfinished requests of ``session_id``, whose home ``dead`` stopped (those forwarded
    to it included: `mark`), and leave the session without a home."""

    def taken(meta: dict[bytes, bytes]) -> _Picked | None:
        if _text(meta.get(b"home")) != dead:
            return None  # recovered already, or claimed
        # The home's own requests (``1``); a forward it never took is not its to end.
        return dead, [field for field, value in meta.items() if value == b"1"], NODE_STOPPED, True

    await _end(store, session_id, taken, ttl_ms=ttl_ms)
    await store.run(store.client.srem(node_sessions_key(dead), session_id))


# What `_end` ends: as which node it writes (the session's home as the meta has it), the marks'
# fields, the error's message, and whether the home lets go of the session with it.
_Picked = tuple[str, list[bytes], str, bool]


async def _end(
    store: RedisStore,
    session_id: str,
    pick: Callable[[dict[bytes, bytes]], _Picked | None],
    *,
    ttl_ms: int,
) -> bool:
    """Log a retryable ``internal`` error ending each request whose mark ``pick`` names in the
    session's meta, and drop those marks; the meta is watched from its read to the end, so a
    request marked, taken or unmarked in between is read again, never ended on a stale list.
    False when ``pick`` found the session not as it expects (None), or no such session."""
    keys = [meta_key(session_id), log_key(session_id), subs_key(session_id)]
    for _ in range(10):
        async with store.translated(), store.client.pipeline(transaction=True) as pipe:
            await pipe.watch(keys[0])
            meta = cast("dict[bytes, bytes]", await pipe.hgetall(keys[0]))
            picked = pick(meta) if meta else None
            if picked is None:
                return False
            writer, fields, message, release = picked
            ids = sorted(field[2:].decode() for field in fields if field[:2] == b"r:")
            if not ids and not release:
                return True
            seq = int(meta[b"seq"])
            events = [encode(_stopped(rid, seq + 1 + n, message)) for n, rid in enumerate(ids)]
            # Trimming nothing (0, 0): a few more events do not overflow the window worth a trim.
            args: list[Any] = [writer, ttl_ms, session_id, _text(meta[b"epoch"]), seq + 1, 0, 0]
            args += ["1" if release else "0", 0, len(ids), *ids, len(events), *events]
            pipe.multi()  # type: ignore[no-untyped-call]
            await store.append_script(keys=keys, args=args, client=pipe)
            try:
                (reply,) = await pipe.execute()
            except WatchError:
                continue  # the meta changed between the read and the script: read again
        if reply != [-2]:
            return True  # -2: the seq moved between the read and the script; read again
    return False


async def orphan(
    store: RedisStore, script: AsyncScript, session_id: str, home: str, dead: str
) -> list[str] | None:
    """At the home ``home``: make the marks ``dead`` left untaken its own (``script`` is
    `server.cluster.scripts.ORPHAN`), the ids of their requests, for the home to end; None when
    ``home`` is not the session's home any more."""
    args = [home, f"{dead}/"]
    reply = await store.run(script(keys=[meta_key(session_id)], args=args, client=store.client))
    return None if reply is None else [_text(rid) for rid in reply]


async def end_untaken(
    store: RedisStore,
    dead: str,
    *,
    alive: Callable[[str], Awaitable[bool]],
    tell: Callable[[str, str], Awaitable[bool]],
    ttl_ms: int,
) -> None:
    """End every request ``dead`` (its lease expired) marked for a home that never took it: a
    live home is told (``tell(home, session id)``: whether it ended them, `orphan`), so that it
    numbers their errors; a session with no live home gets them in its log from here."""
    key = node_marks_key(dead)
    prefix = f"{dead}/".encode()
    for raw in await store.run(store.client.zrange(key, 0, -1)):
        session_id = _text(raw)
        for _ in range(_UNTAKEN_TRIES):
            meta = cast("dict[bytes, bytes]", await store.run(store.client.hgetall(meta_key(session_id))))
            if not _untaken_fields(meta, prefix):
                break  # all taken, taken back or ended (or no such session)
            home = _text(meta.get(b"home"))
            if home and await alive(home):
                if await tell(home, session_id):
                    break
            elif await _end(store, session_id, _untaken(prefix, home), ttl_ms=ttl_ms):
                break
            await asyncio.sleep(_UNTAKEN_RETRY_S)  # the home changed, or did not answer: again
    await store.run(store.client.delete(key))


def _untaken_fields(meta: dict[bytes, bytes], prefix: bytes) -> list[bytes]:
    return [field for field, value in meta.items() if field[:2] == b"r:" and value.startswith(prefix)]


def _untaken(prefix: bytes, home: str) -> Callable[[dict[bytes, bytes]], _Picked | None]:
    """`_end`'s pick of the marks holding a forward id starting with ``prefix``, while the
    session's home is still ``home`` (none, or a dead node)."""

    def pick(meta: dict[bytes, bytes]) -> _Picked | None:
        if _text(meta.get(b"home")) != home:
            return None  # claimed meanwhile: look again
        return home, _untaken_fields(meta, prefix), FORWARDER_STOPPED, False

    return pick


async def recover_node(store: RedisStore, dead: str, *, ttl_ms: int) -> None:
    """`recover` every session whose home was ``dead``, and `unlisten_node` it."""
    for raw in await store.run(store.client.smembers(node_sessions_key(dead))):
        await recover(store, _text(raw), dead, ttl_ms=ttl_ms)
    await store.run(store.client.delete(node_sessions_key(dead)))
    await unlisten_node(store, dead)


async def refresh(store: RedisStore, node_id: str, session_ids: list[str], *, ttl_ms: int) -> bool:
    """Keep the keys of ``session_ids`` (homed at ``node_id``, alive) and the node's list of the
    sessions it listens to for another ``ttl_ms``; whether that list was there (False, while the
    node listens to some: it was taken for dead, and off their ``subs``: `unlisten_node`)."""
    async with store.translated():
        pipe = store.client.pipeline(transaction=False)
        pipe.pexpire(node_subs_key(node_id), ttl_ms)
        for session_id in session_ids:
            for key in (
                meta_key(session_id),
                log_key(session_id),
                subs_key(session_id),
                history_key(session_id),
            ):
                pipe.pexpire(key, ttl_ms)
        replies = await pipe.execute()
    return bool(replies[0])


async def delete(store: RedisStore, session_id: str, node_id: str) -> None:
    """Forget ``session_id``; its transports hear ``!E`` and close."""
    keys = [meta_key(session_id), log_key(session_id), subs_key(session_id)]
    await store.run(store.end_script(keys=keys, args=[session_id], client=store.client))
    async with store.translated():
        pipe = store.client.pipeline(transaction=False)
        pipe.delete(history_key(session_id))
        pipe.srem(node_sessions_key(node_id), session_id)
        await pipe.execute()


def _stopped(request_id: str, seq: int, message: str) -> Error:
    return Error(id=request_id, seq=seq, code=ErrorCode.INTERNAL, message=message, retryable=True)


def _contiguous(events: list[LoggedMessage], last: int) -> list[LoggedMessage]:
    """The run of ``events`` that ends at seq ``last`` with no gap."""
    start, expected = len(events), last
    while start > 0 and events[start - 1].seq == expected:
        start -= 1
        expected -= 1
    return events[start:]
