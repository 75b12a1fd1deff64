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
(`cancel_elsewhere`), which answers with the final Response object (`answer_cancels`). Ownership
is checked by the caller against the stored response, and again by the running node; this module
never decides who may read, and never runs or cancels a generation itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

import orjson

from protocol.errors import ErrorCode, SluiceError

if TYPE_CHECKING:
    from server.cluster.node import Node
    from server.cluster.redis import RedisStore

__all__ = ["END", "EventMirror", "SharedEventLog", "answer_cancels", "cancel_elsewhere"]

log = logging.getLogger("sluice.responses")

_PREFIX: Final = "sluice:response-events:"
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
    does not run it (any more); ``upstream_unavailable`` when that node does not answer."""
    answer = await node.call(node_id, {"op": _CANCEL, "id": response_id, "key": key_id})
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

    def mirror(self, response_id: str) -> EventMirror:
        return EventMirror(self, _PREFIX + response_id)

    async def exists(self, response_id: str) -> bool:
        return bool(await self.redis.run(self.redis.client.exists(_PREFIX + response_id)))

    async def delete(self, response_id: str) -> None:
        await self.redis.run(self.redis.client.delete(_PREFIX + response_id))

    async def events(self, response_id: str, after: int = -1) -> AsyncIterator[dict[str, Any]]:
        """The events with ``sequence_number > after``: those in the list, then live until the end
        (or until nothing came for ``idle_s``: the node running it is gone)."""
        key, index = _PREFIX + response_id, max(after + 1, 0)
        quiet_since = time.monotonic()
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
            if raw:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since > self.idle_s:
                return
            else:
                await asyncio.sleep(self.poll_s)


class EventMirror:
    """One running response's events, copied into its Redis list in order (module docstring)."""

    def __init__(self, shared: SharedEventLog, key: str) -> None:
        self._shared, self._key = shared, key
        self._pending: list[bytes] = []
        self._flusher: asyncio.Task[None] | None = None
        self._written = 0  # entries in the list
        self._broken = False

    def add(self, event: dict[str, Any]) -> None:
        self._push(orjson.dumps(event))

    def end(self) -> None:
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
