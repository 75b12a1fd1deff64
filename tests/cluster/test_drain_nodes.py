"""Draining a node that holds transports of sessions homed elsewhere, from the outside: real
``sluice serve`` nodes sharing one real redis-server and the Ollama emulator.

The session is opened on node ``a`` (its home, where its request runs); its transport resumes on a
second node, which is then sent SIGTERM. PROTOCOL.md: the draining server sends ``goaway`` (a
logged event, numbered in the session's seq) before it closes the connection with 1012 (events
may follow it until then); the client resumes on ``a`` and loses nothing. Over a WebSocket and over an SSE stream.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.cluster.test_nodes import MODEL, node_env
from tests.support.ollama_emulator import Emulator, start_emulator
from tests.support.redis_server import RedisServer, run_redis
from tests.support.server import ServerProcess, start_server

Event = dict[str, Any]


@pytest.fixture(scope="module")
def home() -> Iterator[tuple[RedisServer, Emulator, ServerProcess]]:
    with run_redis() as redis, start_emulator(token_rate=50.0, tokens=120) as emu:
        node = start_server(node_env(redis, emu, SLUICE_NODE_ID="a"))
        try:
            yield redis, emu, node
        finally:
            node.stop()


def _expected(emu: Emulator, prompt: str) -> str:
    record = next(r for r in emu.generations() if r.body.get("prompt") == prompt)
    return emu.expected_text(record.body)


async def _resume_to_done(home: ServerProcess, session: str, last_seq: int) -> list[Event]:
    async with connect(home.ws_url, subprotocols=["sluice.v1"]) as ws:  # type: ignore[list-item]
        hello = {"type": "hello", "protocol": 1, "session": session, "last_seq": last_seq}
        await ws.send(orjson.dumps(hello).decode())
        welcome = orjson.loads(await asyncio.wait_for(ws.recv(), 20))
        assert welcome["resumed"] is True
        events: list[Event] = []
        while not events or events[-1]["type"] != "done":
            events.append(orjson.loads(await asyncio.wait_for(ws.recv(), 20)))
        return events


async def _generate(http: httpx.AsyncClient, node: ServerProcess, session: str, prompt: str) -> None:
    message = {"type": "generate", "id": "g1", "model": MODEL, "prompt": prompt}
    posted = await http.post(f"{node.url}/v1/sessions/{session}/messages", json=message)
    assert posted.status_code == 202


async def _drained_then_resumed(
    emu: Emulator, a: ServerProcess, b: ServerProcess, session: str, prompt: str, events: list[Event]
) -> None:
    """``b`` sent ``events`` before closing 1012, a goaway among them, and exited cleanly; the rest
    of the request reads on ``a``, exactly."""
    assert any(e["type"] == "goaway" for e in events), events[-3:]
    assert b.wait(20) == 0
    events += await _resume_to_done(a, session, events[-1]["seq"])
    _check(emu, prompt, events)


def _check(emu: Emulator, prompt: str, events: list[Event]) -> None:
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    goaways = [e for e in events if e["type"] == "goaway"]
    assert len(goaways) == 1 and goaways[0]["retry_after_ms"] >= 0
    assert "".join(e["text"] for e in events if e["type"] == "delta") == _expected(emu, prompt)
    assert events[-1]["type"] == "done" and events[-1]["finish_reason"] == "stop"


async def test_a_draining_node_sends_goaway_to_a_websocket_of_a_session_homed_elsewhere(
    home: tuple[RedisServer, Emulator, ServerProcess],
) -> None:
    redis, emu, a = home
    prompt = "drained on b, homed on a (ws)"
    b = start_server(node_env(redis, emu, SLUICE_NODE_ID="b-ws"))
    try:
        async with httpx.AsyncClient(timeout=20) as http:
            session = (await http.post(f"{a.url}/v1/sessions", json={})).json()["session"]
            await _generate(http, a, session, prompt)
        events: list[Event] = []
        async with connect(b.ws_url, subprotocols=["sluice.v1"]) as ws:  # type: ignore[list-item]
            await ws.send(orjson.dumps({"type": "hello", "protocol": 1, "session": session}).decode())
            assert orjson.loads(await asyncio.wait_for(ws.recv(), 20))["resumed"] is True
            events.append(orjson.loads(await asyncio.wait_for(ws.recv(), 20)))
            b.signal(signal.SIGTERM)
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    events.append(orjson.loads(await asyncio.wait_for(ws.recv(), 20)))
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012
        await _drained_then_resumed(emu, a, b, session, prompt, events)
    finally:
        b.stop()


async def test_a_draining_node_sends_goaway_to_an_sse_stream_of_a_session_homed_elsewhere(
    home: tuple[RedisServer, Emulator, ServerProcess],
) -> None:
    redis, emu, a = home
    prompt = "drained on b, homed on a (sse)"
    b = start_server(node_env(redis, emu, SLUICE_NODE_ID="b-sse"))
    try:
        events: list[Event] = []
        close: Event = {}
        async with httpx.AsyncClient(timeout=20) as http:
            session = (await http.post(f"{a.url}/v1/sessions", json={})).json()["session"]
            async with http.stream("GET", f"{b.url}/v1/sessions/{session}/events") as stream:
                assert stream.status_code == 200
                await _generate(http, a, session, prompt)
                kind = ""
                async for line in stream.aiter_lines():
                    if line.startswith("event: "):
                        kind = line[7:]
                    elif line.startswith("data: ") and kind == "close":
                        close = orjson.loads(line[6:])
                    elif line.startswith("data: "):
                        events.append(orjson.loads(line[6:]))
                        if len(events) == 1:
                            b.signal(signal.SIGTERM)
        assert close.get("code") == 1012, close
        await _drained_then_resumed(emu, a, b, session, prompt, events)
    finally:
        b.stop()
