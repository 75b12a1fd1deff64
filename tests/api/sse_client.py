"""A small ``text/event-stream`` reader for tests: fields exactly as a browser's EventSource sees them.

Reads an httpx response line by line and yields each dispatched event (``id``, ``event``,
``data``), and also what an EventSource hides (comment lines, ``retry:``), so tests can check
the keep-alive and the reconnect delay. Test support only.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson

__all__ = ["SseItem", "read_sse"]


@dataclass
class SseItem:
    kind: str  # "event" | "comment" | "retry"
    data: str = ""
    event: str | None = None
    id: str | None = None
    fields: list[str] = field(default_factory=list)

    def json(self) -> Any:
        return orjson.loads(self.data)


async def read_sse(response: httpx.Response) -> AsyncIterator[SseItem]:
    """Each event, comment and ``retry:`` of ``response``'s body, in order."""
    data: list[str] = []
    event: str | None = None
    event_id: str | None = None
    seen: list[str] = []
    async for line in response.aiter_lines():
        if line == "":
            if data:
                yield SseItem("event", "\n".join(data), event, event_id, seen)
            data, event, event_id, seen = [], None, None, []
            continue
        if line.startswith(":"):
            yield SseItem("comment", line[1:].strip())
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        seen.append(name)
        if name == "data":
            data.append(value)
        elif name == "event":
            event = value
        elif name == "id":
            event_id = value
        elif name == "retry":
            yield SseItem("retry", value)
