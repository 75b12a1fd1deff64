"""Driving one SSE session from a test: open it, stream its events, post messages.

`EventStream` reads ``GET /v1/sessions/{id}/events`` in a background task and keeps every logged
event it saw (in order, with the SSE ``id`` checked against the message's ``seq``) plus the
transport-level ``pong``/``close`` events; tests wait for what they need with `until`. Test
support only.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import httpx

from tests.api.sse_client import SseItem, read_sse

__all__ = ["EventStream", "open_session", "post"]

Message = dict[str, Any]


async def open_session(http: httpx.AsyncClient, **hello: Any) -> Message:
    response = await http.post("/v1/sessions", json=hello)
    assert response.status_code == 201, response.text
    welcome: Message = response.json()
    assert welcome["type"] == "welcome"
    return welcome


async def post(client: httpx.AsyncClient, session: str, body: Any) -> httpx.Response:
    return await client.post(f"/v1/sessions/{session}/messages", json=body)


class EventStream:
    """One attached events stream of ``session``; `close` it (or use ``async with``)."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        session: str,
        *,
        last_event_id: int | None = None,
        query: bool = False,
        headers: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
    ) -> None:
        self.client = client
        self.session = session
        self.events: list[Message] = []  # logged events, in arrival order
        self.items: list[SseItem] = []  # everything read, comments and retry included
        self.status: int | None = None
        self.headers: httpx.Headers | None = None
        self.closed_with: Message | None = None
        self.ended = asyncio.Event()
        self._opened = asyncio.Event()
        self._changed = asyncio.Event()
        params = dict(params or {})
        if query and last_event_id is not None:
            params["last_event_id"] = str(last_event_id)
        all_headers = dict(headers or {})
        if last_event_id is not None and not query:
            all_headers["Last-Event-ID"] = str(last_event_id)
        self._task = asyncio.create_task(self._read(params, all_headers))

    async def _read(self, params: dict[str, str], headers: dict[str, str]) -> None:
        url = f"/v1/sessions/{self.session}/events"
        try:
            async with self.client.stream("GET", url, params=params, headers=headers) as response:
                self.status = response.status_code
                self.headers = response.headers
                self._opened.set()
                if response.status_code != 200:
                    await response.aread()
                    return
                async for item in read_sse(response):
                    self.items.append(item)
                    if item.kind == "event":
                        message = item.json()
                        if item.event == "close":
                            self.closed_with = message
                        elif item.event != "pong":
                            assert item.id == str(message["seq"]), (item.id, message)
                            assert item.event == message["type"]
                            self.events.append(message)
                    self._changed.set()
        finally:
            self._opened.set()
            self.ended.set()
            self._changed.set()

    async def opened(self, within: float = 10.0) -> int:
        await asyncio.wait_for(self._opened.wait(), within)
        assert self.status is not None
        return self.status

    async def until(self, predicate: Callable[[], bool], within: float = 20.0) -> None:
        """Wait until ``predicate()`` holds (checked after every item read) or fail."""
        deadline = time.monotonic() + within
        while not predicate():
            if self.ended.is_set():
                assert predicate(), "the event stream ended first"
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out; last events: {self.events[-3:]}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    def terminal(self, request_id: str) -> Message | None:
        for event in self.events:
            if event.get("id") == request_id and event["type"] in (
                "done",
                "embedding",
                "classification",
                "error",
            ):
                return event
        return None

    def text(self, request_id: str) -> str:
        return "".join(e["text"] for e in self.events if e["type"] == "delta" and e["id"] == request_id)

    @property
    def last_seq(self) -> int:
        return self.events[-1]["seq"] if self.events else 0

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def __aenter__(self) -> EventStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
