"""Where stored OpenAI Responses live: one small interface (`ResponseStore`), in this process's
memory (`MemoryResponseStore`) or, in cluster mode, in the cluster's Redis (`RedisResponseStore`).

A stored response is the Response object as last answered, the input items of its request (with
their ids, for ``GET /v1/responses/{id}/input_items``) and the whole conversation in protocol
turns (for ``previous_response_id``). It belongs to the key that made it: any other key is told it
does not exist. It expires ``ttl_s`` after it was last written, and the store holds at most
``max_count`` responses (the oldest go first), so that no client can grow the server without
limit. In Redis, a response is one key with that TTL, visible from every node, and the bound is
the cluster's: a sorted set indexes the responses by last write, and a write past ``max_count``
deletes the oldest (their event logs too) in the same script. This module never runs a generation, and only the Redis store touches
the network, through the node's one `RedisStore` connection pool.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Final, Protocol

import orjson

if TYPE_CHECKING:
    from server.cluster.redis import RedisStore

__all__ = ["MemoryResponseStore", "RedisResponseStore", "ResponseStore", "StoredResponse", "drop_expired"]

_PREFIX: Final = "sluice:response:"
_INDEX: Final = "sluice:responses"  # response id -> when it was last written (ms), every node's
_EVENTS: Final = "sluice:response-events:"  # `server.api.compat.responses_log`'s lists
# Store ARGV[1] at KEYS[1] for ARGV[2] ms, index it as ARGV[5] at ARGV[3] (now, ms) in KEYS[2],
# drop the index's expired entries, and delete the oldest responses past ARGV[4] with their event
# lists (keys named from the prefixes ARGV[6], ARGV[7]: one Redis server, not Redis Cluster).
# Returns how many it deleted.
_PUT: Final = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
local now, ttl, max = tonumber(ARGV[3]), tonumber(ARGV[2]), tonumber(ARGV[4])
redis.call('ZADD', KEYS[2], now, ARGV[5])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - ttl)
local over = redis.call('ZCARD', KEYS[2]) - max
if over <= 0 then
  return 0
end
local oldest = redis.call('ZRANGE', KEYS[2], 0, over - 1)
for _, id in ipairs(oldest) do
  redis.call('DEL', ARGV[6] .. id, ARGV[7] .. id)
end
redis.call('ZREMRANGEBYRANK', KEYS[2], 0, over - 1)
return over
"""


@dataclass(slots=True)
class StoredResponse:
    """One response as stored: the Response object, its request's input items, the conversation."""

    owner: str  # the key_id that made it
    response: dict[str, Any]
    input_items: list[dict[str, Any]]
    turns: list[dict[str, Any]] = field(default_factory=list)  # protocol turns, input then output
    node: str = ""  # the cluster node running it, while it runs in the background ("" when none)


class ResponseStore(Protocol):
    """Stored responses by id, each visible only to its owner."""

    async def put(self, response_id: str, stored: StoredResponse) -> None: ...

    async def get(self, response_id: str, owner: str) -> StoredResponse | None: ...

    async def delete(self, response_id: str, owner: str) -> bool: ...


class MemoryResponseStore:
    """A `ResponseStore` in this process's memory, bounded in count and time."""

    def __init__(self, *, ttl_s: float, max_count: int, clock: Callable[[], float] = time.monotonic) -> None:
        if ttl_s <= 0 or max_count < 1:
            raise ValueError("ttl_s and max_count must be positive")
        self.ttl_s = ttl_s
        self.max_count = max_count
        self._clock = clock
        # Ordered by last write: the first entry is the next to expire.
        self._entries: OrderedDict[str, tuple[float, StoredResponse]] = OrderedDict()

    def __len__(self) -> int:
        self._expire()
        return len(self._entries)

    async def put(self, response_id: str, stored: StoredResponse) -> None:
        """Store (or replace) ``response_id``; the oldest responses go past ``max_count``."""
        self._expire()
        self._entries.pop(response_id, None)
        self._entries[response_id] = (self._clock() + self.ttl_s, stored)
        while len(self._entries) > self.max_count:
            self._entries.popitem(last=False)

    async def get(self, response_id: str, owner: str) -> StoredResponse | None:
        """The stored response, or None when it is unknown, expired or another key's."""
        self._expire()
        entry = self._entries.get(response_id)
        if entry is None or entry[1].owner != owner:
            return None
        return entry[1]

    async def delete(self, response_id: str, owner: str) -> bool:
        """Forget ``response_id``; False when ``owner`` could not see it."""
        if await self.get(response_id, owner) is None:
            return False
        del self._entries[response_id]
        return True

    def _expire(self) -> None:
        drop_expired(self._entries, self._clock())


def drop_expired(entries: OrderedDict[str, tuple[float, Any]], now: float) -> None:
    """Drop the entries expired by ``now`` from ``entries`` (id → (expires at, value)), which are
    kept in the order they expire."""
    while entries:
        key, (expires_at, _) = next(iter(entries.items()))
        if expires_at > now:
            return
        del entries[key]


class RedisResponseStore:
    """A `ResponseStore` in the cluster's Redis: every node sees the same responses."""

    def __init__(self, redis: RedisStore, *, ttl_s: float, max_count: int) -> None:
        if ttl_s <= 0 or max_count < 1:
            raise ValueError("ttl_s and max_count must be positive")
        self.redis = redis
        self.ttl_ms = int(ttl_s * 1000)
        self.max_count = max_count
        self._put = redis.client.register_script(_PUT)

    async def put(self, response_id: str, stored: StoredResponse) -> None:
        """Store (or replace) ``response_id`` for the TTL; the oldest responses of the cluster go
        past ``max_count``."""
        data = orjson.dumps(asdict(stored))
        now_ms = int(time.time() * 1000)
        args: list[bytes | int | str] = [
            data,
            self.ttl_ms,
            now_ms,
            self.max_count,
            response_id,
            _PREFIX,
            _EVENTS,
        ]
        await self.redis.run(self._put(keys=[_PREFIX + response_id, _INDEX], args=args))

    async def get(self, response_id: str, owner: str) -> StoredResponse | None:
        """The stored response, or None when it is unknown, expired or another key's."""
        raw = await self.redis.run(self.redis.client.get(_PREFIX + response_id))
        if raw is None:
            return None
        stored = StoredResponse(**orjson.loads(raw))
        return stored if stored.owner == owner else None

    async def delete(self, response_id: str, owner: str) -> bool:
        """Forget ``response_id``; False when ``owner`` could not see it."""
        if await self.get(response_id, owner) is None:
            return False
        async with self.redis.client.pipeline(transaction=False) as pipe:
            pipe.delete(_PREFIX + response_id)
            pipe.zrem(_INDEX, response_id)
            await self.redis.run(pipe.execute())
        return True
