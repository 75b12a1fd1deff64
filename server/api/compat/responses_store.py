"""Where stored OpenAI Responses live: one small interface (`ResponseStore`) and its in-memory
implementation (`MemoryResponseStore`).

A stored response is the Response object as last answered, the input items of its request (with
their ids, for ``GET /v1/responses/{id}/input_items``) and the whole conversation in protocol
turns (for ``previous_response_id``). It belongs to the key that made it: any other key is told it
does not exist. It expires ``ttl_s`` after it was last written, and the store holds at most
``max_count`` responses (the oldest go first), so that no client can grow the server without
limit. A cluster-wide store (Redis) implements the same interface; this module never runs a
generation and never touches the network.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = ["MemoryResponseStore", "ResponseStore", "StoredResponse"]


@dataclass(slots=True)
class StoredResponse:
    """One response as stored: the Response object, its request's input items, the conversation."""

    owner: str  # the key_id that made it
    response: dict[str, Any]
    input_items: list[dict[str, Any]]
    turns: list[dict[str, Any]] = field(default_factory=list)  # protocol turns, input then output


class ResponseStore(Protocol):
    """Stored responses by id, each visible only to its owner."""

    def put(self, response_id: str, stored: StoredResponse) -> None: ...

    def get(self, response_id: str, owner: str) -> StoredResponse | None: ...

    def delete(self, response_id: str, owner: str) -> bool: ...


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

    def put(self, response_id: str, stored: StoredResponse) -> None:
        """Store (or replace) ``response_id``; the oldest responses go past ``max_count``."""
        self._expire()
        self._entries.pop(response_id, None)
        self._entries[response_id] = (self._clock() + self.ttl_s, stored)
        while len(self._entries) > self.max_count:
            self._entries.popitem(last=False)

    def get(self, response_id: str, owner: str) -> StoredResponse | None:
        """The stored response, or None when it is unknown, expired or another key's."""
        self._expire()
        entry = self._entries.get(response_id)
        if entry is None or entry[1].owner != owner:
            return None
        return entry[1]

    def delete(self, response_id: str, owner: str) -> bool:
        """Forget ``response_id``; False when ``owner`` could not see it."""
        if self.get(response_id, owner) is None:
            return False
        del self._entries[response_id]
        return True

    def _expire(self) -> None:
        now = self._clock()
        while self._entries:
            response_id, (expires_at, _) = next(iter(self._entries.items()))
            if expires_at > now:
                return
            del self._entries[response_id]
