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
read again); a forwarded request the home never took stays marked, for its forwarder; `refresh` keeps a live session's keys;
`delete` forgets a session.

Nothing here keeps state or decides anything: `server.cluster.sessions` does.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any, cast

from redis.commands.core import AsyncScript
from redis.exceptions import WatchError

from protocol.codec import encode
from protocol.errors import ErrorCode
from protocol.messages import Error, LoggedMessage
from server.cluster import histories
from server.cluster.eventlog import decode_event
from server.cluster.redis import RedisStore
from server.cluster.scripts import history_key, log_key, meta_key, node_sessions_key, node_subs_key, subs_key

__all__ = [
    "NODE_STOPPED",
    "Claimed",
    "attach_generation",
    "attach_token",
    "claim",
    "create",
    "delete",
    "listen",
    "mark",
    "recover",
    "recover_node",
    "refresh",
    "take",
    "unlisten",
    "unmark",
]

NODE_STOPPED = "the node running this request stopped"


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
) -> list[bool] | None:
    """Before forwarding ``request_ids`` to ``home`` (``script`` is `server.cluster.scripts.MARK`):
    per id whether this forward marked it (False: one of that id is in flight already); None when
    ``home`` is not the session's home any more (nothing marked)."""
    args = [home, forward_id, *request_ids]
    reply = await store.run(script(keys=[meta_key(session_id)], args=args, client=store.client))
    return None if reply is None else [bool(n) for n in reply]


async def take(
    store: RedisStore,
    script: AsyncScript,
    session_id: str,
    node_id: str,
    forward_id: str,
    request_ids: list[str],
) -> bool:
    """At the home, before running forwarded ``request_ids`` (``script`` is
    `server.cluster.scripts.TAKE`): whether ``node_id`` is still the home (then the marks are its
    own); False: they must not run here."""
    args = [node_id, forward_id, *request_ids]
    reply = await store.run(script(keys=[meta_key(session_id)], args=args, client=store.client))
    return reply is not None


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
    to it included: `mark`); the meta is watched from its read to the end, so a request marked or
    unmarked in between is read again, never ended on a stale list."""
    keys = [meta_key(session_id), log_key(session_id), subs_key(session_id)]
    for _ in range(10):
        async with store.translated(), store.client.pipeline(transaction=True) as pipe:
            await pipe.watch(keys[0])
            meta = cast("dict[bytes, bytes]", await pipe.hgetall(keys[0]))
            if not meta or _text(meta.get(b"home")) != dead:
                break
            seq = int(meta[b"seq"])
            # The home's own requests (``1``); a forward it never took is not its to end.
            ids = sorted(
                field[2:].decode() for field, value in meta.items() if field[:2] == b"r:" and value == b"1"
            )
            events = [encode(_stopped(rid, seq + 1 + n)) for n, rid in enumerate(ids)]
            # Trimming nothing (0, 0): a few more events do not overflow the window worth a trim.
            args: list[Any] = [dead, ttl_ms, session_id, _text(meta[b"epoch"]), seq + 1, 0, 0, "1"]
            args += [0, len(ids), *ids, len(events), *events]
            pipe.multi()  # type: ignore[no-untyped-call]
            await store.append_script(keys=keys, args=args, client=pipe)
            try:
                (reply,) = await pipe.execute()
            except WatchError:
                continue  # the meta changed between the read and the script: read again
        if reply != [-2]:
            break  # -2: the seq moved between the read and the script; read again
    await store.run(store.client.srem(node_sessions_key(dead), session_id))


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


def _stopped(request_id: str, seq: int) -> Error:
    return Error(id=request_id, seq=seq, code=ErrorCode.INTERNAL, message=NODE_STOPPED, retryable=True)


def _contiguous(events: list[LoggedMessage], last: int) -> list[LoggedMessage]:
    """The run of ``events`` that ends at seq ``last`` with no gap."""
    start, expected = len(events), last
    while start > 0 and events[start - 1].seq == expected:
        start -= 1
        expected -= 1
    return events[start:]
