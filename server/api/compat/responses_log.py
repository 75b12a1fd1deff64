"""A background response's event log in the cluster's Redis, so that any node can resume it, and
its cancel sent to the node running it.

In cluster mode the node running a background response mirrors every event of its
`ResponseRun` into one Redis list (`EventMirror`: batched, in order, with the stored responses'
TTL; each batch is appended only where the list's length says it goes, so a write repeated after
a lost reply adds nothing twice), and ends it with a marker once the run has ended, cancelled
included. Any other node replays that list after a sequence number and then follows it live by
polling (`SharedEventLog.events`), until the terminal event or the marker. The list's index is
the event's ``sequence_number``; a mirror that failed to write once writes nothing more, so that
the list never has a gap: readers elsewhere then see it stop growing and end after ``idle_s``.
A cancel asked of another node travels as a control message to the node running the response
(`cancel_elsewhere`), which answers with the final Response object (`answer_cancels`); a node
that does not answer in time is a retryable ``upstream_unavailable``.

A node that dies leaves its background responses running nowhere. Each node keeps the ids of the
ones it runs in a Redis set of its own (`SharedEventLog.track`; a mirror's end removes its id).
`Orphans` settles a dead node's responses: the node that reaps the dead one's lease does it for
all of them (`settle_orphans_of_dead_nodes`), and any node that reads one (GET, a stream resumed
there, a cancel) and finds its node's lease gone does it for that one (`Orphans.check`). Settling
appends a ``response.failed`` (a retryable ``server_error``, the output so far rebuilt from the
log) and the end marker where the log ends, once whoever races to do it, and stores the response
so; readers there end with it. While the node lives, `Orphans.current` is the stored response
with the output so far from the log (the store holds it only as last settled). Ownership
is checked by the caller against the stored response, and again by the running node; this module
never decides who may read, and never runs or cancels a generation itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

import orjson

from protocol.errors import ErrorCode, SluiceError
from server.api.compat.responses_model import message_item
from server.api.compat.responses_store import ResponseStore, StoredResponse

if TYPE_CHECKING:
    from server.cluster.node import Node
    from server.cluster.redis import RedisStore

__all__ = [
    "END",
    "EventMirror",
    "Orphans",
    "SharedEventLog",
    "answer_cancels",
    "cancel_elsewhere",
    "output_so_far",
    "settle_orphans_of_dead_nodes",
]

log = logging.getLogger("sluice.responses")

_PREFIX: Final = "sluice:response-events:"
_RUNNING_ON: Final = "sluice:node-responses:"  # + node id: a set of [response id, owner] JSON
_ORPHANED: Final = "the node running this response stopped before it finished; retry it"
_DELTA: Final = "response.output_text.delta"
_ITEM_EVENTS: Final = frozenset({"response.output_item.added", "response.output_item.done"})
END: Final = b'{"type":"sluice.end"}'  # after the last event: never sent to a client
_TERMINAL: Final = frozenset({"response.completed", "response.incomplete", "response.failed"})
_CANCEL: Final = "response.cancel"
_BATCH: Final = 512  # events per write at most
# Append ARGV[3..] to the list KEYS[1] if it holds ARGV[2] entries; a write repeated after a lost
# reply finds them there already. -1 when the list is neither: the mirror has a gap, stop.
_APPEND: Final = """
local n = redis.call('LLEN', KEYS[1])
local at = tonumber(ARGV[2])
if n == at then
  redis.call('RPUSH', KEYS[1], unpack(ARGV, 3))
elseif n ~= at + #ARGV - 2 then
  return -1
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return n
"""
# Cancels a run: its id and owner -> the final Response object, or None when it is not here.
Canceller = Callable[[str, str], Awaitable[dict[str, Any] | None]]


def answer_cancels(node: Node, cancel: Canceller) -> None:
    """Have ``node`` answer other nodes' cancels with ``cancel``; every other control message goes
    to the handler it had."""
    others = node.on_control

    async def on_control(message: dict[str, Any]) -> object:
        if message.get("op") == _CANCEL:
            return await cancel(str(message.get("id")), str(message.get("key")))
        return await others(message) if others is not None else None

    node.on_control = on_control


async def cancel_elsewhere(node: Node, node_id: str, response_id: str, key_id: str) -> dict[str, Any] | None:
    """Cancel ``response_id`` on ``node_id``: its final Response object, or None when that node
    does not run it (any more); ``upstream_unavailable`` (retryable) when that node does not answer."""
    try:
        answer = await node.call(node_id, {"op": _CANCEL, "id": response_id, "key": key_id})
    except SluiceError:
        raise SluiceError(
            ErrorCode.UPSTREAM_UNAVAILABLE,
            f"node {node_id!r}, which runs response {response_id!r}, did not answer the cancel; retry it",
            retry_after_ms=1000,
        ) from None
    return answer if isinstance(answer, dict) else None


class SharedEventLog:
    """The background responses' event lists in Redis, seen from this node."""

    def __init__(
        self, redis: RedisStore, *, ttl_s: float, poll_s: float = 0.05, idle_s: float = 30.0
    ) -> None:
        self.redis = redis
        self.ttl_ms = int(ttl_s * 1000)
        self.poll_s, self.idle_s = poll_s, idle_s
        self.append = redis.client.register_script(_APPEND)

    def mirror(self, response_id: str, tracked: tuple[str, bytes] | None = None) -> EventMirror:
        """The mirror of ``response_id``'s events; ``tracked``: the (set key, member) that
        `track` added, removed once the end is written."""
        return EventMirror(self, _PREFIX + response_id, tracked)

    async def track(self, node_id: str, response_id: str, owner: str) -> tuple[str, bytes]:
        """Note that ``node_id`` runs ``response_id`` (for `Orphans`); what `mirror` removes."""
        key, member = _RUNNING_ON + node_id, orjson.dumps([response_id, owner])
        async with self.redis.client.pipeline(transaction=False) as pipe:
            pipe.sadd(key, member)
            pipe.pexpire(key, self.ttl_ms)
            await self.redis.run(pipe.execute())
        return key, member

    async def exists(self, response_id: str) -> bool:
        return bool(await self.redis.run(self.redis.client.exists(_PREFIX + response_id)))

    async def delete(self, response_id: str) -> None:
        await self.redis.run(self.redis.client.delete(_PREFIX + response_id))

    async def events(
        self, response_id: str, after: int = -1, on_quiet: Callable[[], Awaitable[None]] | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """The events with ``sequence_number > after``: those in the list, then live until the end
        (or until nothing came for ``idle_s``: the node running it is gone). ``on_quiet`` runs
        once per second of nothing new (`Orphans.check`: it settles a dead node's response)."""
        key, index = _PREFIX + response_id, max(after + 1, 0)
        quiet_since = checked = time.monotonic()
        while True:
            raw: list[bytes] = await self.redis.run(self.redis.client.lrange(key, index, index + 255))
            for data in raw:
                if data == END:
                    return
                event = orjson.loads(data)
                if event.get("sequence_number") != index:  # never a gap or a repeat
                    raise SluiceError(ErrorCode.INTERNAL, f"response {response_id} event log out of order")
                yield event
                index += 1
                if event["type"] in _TERMINAL:
                    return
            now = time.monotonic()
            if raw:
                quiet_since = checked = now
            elif now - quiet_since > self.idle_s:
                return
            elif on_quiet is not None and now - checked >= 1.0:
                checked = now
                await on_quiet()
            else:
                await asyncio.sleep(self.poll_s)

    async def read(self, response_id: str) -> list[dict[str, Any]]:
        """Every event in the list (the end marker left out)."""
        raw: list[bytes] = await self.redis.run(self.redis.client.lrange(_PREFIX + response_id, 0, -1))
        return [orjson.loads(data) for data in raw if data != END]


def output_so_far(events: list[dict[str, Any]], status: str) -> list[dict[str, Any]]:
    """A response's output items as its events left them; a message item still open holds the
    text of its deltas, with ``status``."""
    items: dict[int, dict[str, Any]] = {}
    texts: dict[str, list[str]] = {}
    for event in events:
        kind = event["type"]
        if kind == _DELTA:
            texts.setdefault(event["item_id"], []).append(event["delta"])
        elif kind in _ITEM_EVENTS:
            items[event["output_index"]] = event["item"]
    output = []
    for index in sorted(items):
        item = items[index]
        if item["type"] == "message" and item["status"] == "in_progress":
            item = message_item(item["id"], "".join(texts.get(item["id"], ())), status)
        output.append(item)
    return output


class Orphans:
    """Settles the background responses of dead nodes (module docstring)."""

    def __init__(self, shared: SharedEventLog, store: ResponseStore, node: Node) -> None:
        self.shared, self.store, self.node = shared, store, node

    def running_elsewhere(self, stored: StoredResponse) -> bool:
        running = stored.response["status"] in ("queued", "in_progress")
        return running and bool(stored.node) and stored.node != self.node.id

    async def current(self, stored: StoredResponse) -> dict[str, Any]:
        """``stored``'s Response object now: settled when its node died, else with its output so
        far from the log while it runs elsewhere."""
        if not self.running_elsewhere(stored):
            return stored.response
        if not await self.node.alive(stored.node):
            return await self.settle(stored)
        events = await self.shared.read(stored.response["id"])
        output = output_so_far(events, "in_progress")
        # ``stored`` was read before its node stored it as started, its events after: it has
        # output, so it runs (a queued response has none).
        status = "in_progress" if output else stored.response["status"]
        return {**stored.response, "status": status, "output": output}

    async def check(self, response_id: str, owner: str) -> None:
        """Settle ``response_id`` if it runs on a node that is dead."""
        stored = await self.store.get(response_id, owner)
        if stored is not None and self.running_elsewhere(stored) and not await self.node.alive(stored.node):
            await self.settle(stored)

    async def settle(self, stored: StoredResponse) -> dict[str, Any]:
        """End ``stored`` ``failed`` in its log and in the store: the final Response object."""
        response_id = stored.response["id"]
        events = await self.shared.read(response_id)
        if events and events[-1]["type"] in _TERMINAL:
            view: dict[str, Any] = events[-1]["response"]  # it ended; the store may lag
        else:
            view = {
                **stored.response,
                "status": "failed",
                "error": {"code": "server_error", "message": _ORPHANED},
                "output": output_so_far(events, "incomplete"),
            }
            failed = {"type": "response.failed", "sequence_number": len(events), "response": view}
            shared = self.shared
            args: list[bytes | int] = [shared.ttl_ms, len(events), orjson.dumps(failed), END]
            await shared.redis.run(shared.append(keys=[_PREFIX + response_id], args=args))
        current = await self.store.get(response_id, stored.owner)
        if current is not None and current.response["status"] in ("queued", "in_progress"):
            ended = StoredResponse(stored.owner, view, stored.input_items, stored.turns)
            await self.store.put(response_id, ended)
        return view

    async def settle_node(self, node_id: str) -> None:
        """Settle every response ``node_id`` (dead) was running."""
        key = _RUNNING_ON + node_id
        members: list[bytes] = await self.shared.redis.run(self.shared.redis.client.smembers(key))
        for member in members:
            response_id, owner = orjson.loads(member)
            stored = await self.store.get(response_id, owner)
            if (
                stored is not None
                and stored.node == node_id
                and stored.response["status"] in ("queued", "in_progress")
            ):
                await self.settle(stored)
        await self.shared.redis.run(self.shared.redis.client.delete(key))


def settle_orphans_of_dead_nodes(node: Node, orphans: Orphans) -> None:
    """Have ``node``, when it reaps a dead node, settle that node's responses too (after the
    handler it had)."""
    others = node.on_dead

    async def on_dead(node_id: str) -> None:
        if others is not None:
            await others(node_id)
        try:
            await orphans.settle_node(node_id)
        except SluiceError as exc:
            log.warning("settling the responses of dead node %s failed: %s", node_id, exc.message)

    node.on_dead = on_dead


class EventMirror:
    """One running response's events, copied into its Redis list in order (module docstring)."""

    def __init__(self, shared: SharedEventLog, key: str, tracked: tuple[str, bytes] | None = None) -> None:
        self._shared, self._key, self._tracked = shared, key, tracked
        self._pending: list[bytes] = []
        self._flusher: asyncio.Task[None] | None = None
        self._written = 0  # entries in the list
        self._broken = False
        self._ended = False

    def add(self, event: dict[str, Any]) -> None:
        self._push(orjson.dumps(event))

    def end(self) -> None:
        self._ended = True
        self._push(END)

    def _push(self, data: bytes) -> None:
        if self._broken:
            return
        self._pending.append(data)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name=f"sluice {self._key}")

    async def _flush(self) -> None:
        shared = self._shared
        while self._pending and not self._broken:
            batch, self._pending = self._pending[:_BATCH], self._pending[_BATCH:]
            try:
                args: list[bytes | int] = [shared.ttl_ms, self._written, *batch]
                found = await shared.redis.run(shared.append(keys=[self._key], args=args))
            except SluiceError as exc:
                found, reason = -1, exc.message
            else:
                reason = "the list has a gap"
            if found == -1:
                log.warning("response events not mirrored to redis (%s): %s", self._key, reason)
                self._broken = True
                self._pending.clear()
            else:
                self._written += len(batch)
        if self._tracked is not None and not self._pending and (self._broken or self._ended):
            key, member = self._tracked
            self._tracked = None
            with contextlib.suppress(SluiceError):  # the set's TTL drops it otherwise
                await shared.redis.run(shared.redis.client.srem(key, member))
