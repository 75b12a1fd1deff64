"""One session moving WebSocket → SSE → WebSocket mid-generation loses and repeats nothing."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
import orjson
import pytest
import websockets
from websockets.exceptions import ConnectionClosed

from tests.api.conftest import MODEL
from tests.support.ollama_emulator import Emulator
from tests.transports.sse.session_helpers import EventStream

pytestmark = pytest.mark.timeout(120)


async def _recv(ws: websockets.ClientConnection) -> dict[str, Any]:
    message: dict[str, Any] = orjson.loads(await asyncio.wait_for(ws.recv(), 20.0))
    return message


async def _drain_until_closed(ws: websockets.ClientConnection) -> int | None:
    """Read what was still in flight on a socket being taken over; its close code."""
    try:
        for _ in range(100_000):
            await asyncio.wait_for(ws.recv(), 10.0)
    except ConnectionClosed as closed:
        return closed.rcvd.code if closed.rcvd is not None else None
    raise AssertionError("the socket was never closed")


async def test_ws_to_sse_to_ws(base_url: str, emulator: Emulator, paced: Callable[..., None]) -> None:
    paced(token_rate=100.0)
    ws_url = base_url.replace("http://", "ws://") + "/v1/ws"
    prompt = "a session that moves between transports"
    kept: list[dict[str, Any]] = []  # every logged event the client processed, in order
    async with websockets.connect(ws_url, subprotocols=["sluice.v1"]) as first:
        await first.send(orjson.dumps({"type": "hello", "protocol": 1}).decode())
        welcome = await _recv(first)
        session = welcome["session"]
        await first.send(
            orjson.dumps({"type": "generate", "id": "g", "model": MODEL, "prompt": prompt}).decode()
        )
        while sum(e["type"] == "delta" for e in kept) < 10:
            kept.append(await _recv(first))
        # Move to SSE: the client stops reading the socket and resumes after what it processed.
        async with httpx.AsyncClient(base_url=base_url, timeout=30.0) as http:
            stream = EventStream(http, session, last_event_id=kept[-1]["seq"])
            assert await stream.opened() == 200
            assert await _drain_until_closed(first) == 4009
            await stream.until(lambda: len(stream.events) >= 10 or stream.terminal("g") is not None)
            on_sse = list(stream.events)
            assert on_sse[0]["seq"] == kept[-1]["seq"] + 1
            kept.extend(on_sse)
            # And back to a WebSocket, resuming after the last event processed from SSE.
            async with websockets.connect(ws_url, subprotocols=["sluice.v1"]) as second:
                hello = {"type": "hello", "protocol": 1, "session": session, "last_seq": kept[-1]["seq"]}
                await second.send(orjson.dumps(hello).decode())
                resumed = await _recv(second)
                assert resumed["type"] == "welcome" and resumed["resumed"] is True
                await asyncio.wait_for(stream.ended.wait(), 10.0)
                assert stream.closed_with is not None and stream.closed_with["code"] == 4009
                while not kept or kept[-1]["type"] != "done":
                    kept.append(await _recv(second))
            await stream.close()
    assert [e["seq"] for e in kept] == list(range(1, len(kept) + 1))
    assert "".join(e["text"] for e in kept if e["type"] == "delta") == emulator.expected_text(
        {"prompt": prompt}
    )
