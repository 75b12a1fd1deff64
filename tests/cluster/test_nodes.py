"""Cluster mode from the outside: real ``sluice serve`` nodes on loopback sharing one real
redis-server and the Ollama emulator. Resume on another node mid-stream, a long stream cut every
few deltas and resumed on a random node each time, SSE POST on one node and GET on another,
cancel and takeover across nodes, a node SIGKILLed mid-request, ``--workers 2``."""

from __future__ import annotations

import asyncio
import random
import signal
import time
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.support.ollama_emulator import Emulator, start_emulator
from tests.support.redis_server import RedisServer, run_redis
from tests.support.server import ServerProcess, start_server

MODEL = "llama3.2:1b"
Event = dict[str, Any]


def node_env(redis: RedisServer, emu: Emulator, **extra: str) -> dict[str, str]:
    return {
        "SLUICE_OLLAMA_URLS": emu.url,
        "SLUICE_LOAD_LOCAL_GENERATION": "false",
        "SLUICE_DEFAULT_MODEL": MODEL,
        "SLUICE_REDIS_URL": redis.url,
        "SLUICE_LOG_LEVEL": "warning",
        **extra,
    }


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[RedisServer, Emulator, list[ServerProcess]]]:
    with run_redis() as redis, start_emulator(token_rate=100.0, tokens=60) as emu:
        nodes: list[ServerProcess] = []
        try:
            for name in ("a", "b"):
                nodes.append(start_server(node_env(redis, emu, SLUICE_NODE_ID=name)))
            yield redis, emu, nodes
        finally:
            for node in nodes:
                node.stop()


async def _open(url: str) -> ClientConnection:
    return await connect(url, subprotocols=["sluice.v1"])  # type: ignore[list-item]


async def _recv(ws: ClientConnection, within: float = 20.0) -> Event:
    event: Event = orjson.loads(await asyncio.wait_for(ws.recv(), within))
    return event


async def _send(ws: ClientConnection, message: Event) -> None:
    await ws.send(orjson.dumps(message).decode())


async def _hello(ws: ClientConnection, session: str | None = None, last_seq: int = 0) -> Event:
    await _send(ws, {"type": "hello", "protocol": 1, "session": session, "last_seq": last_seq})
    return await _recv(ws)


def _generate(request_id: str, prompt: str) -> Event:
    return {"type": "generate", "id": request_id, "model": MODEL, "prompt": prompt}


def _check_stream(emu: Emulator, events: list[Event], prompt: str) -> None:
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    record = next(r for r in emu.generations() if r.body.get("prompt") == prompt)
    assert "".join(e["text"] for e in events if e["type"] == "delta") == emu.expected_text(record.body)
    assert events[-1]["type"] == "done" and events[-1]["finish_reason"] == "stop"


async def test_a_session_resumes_on_the_other_node_mid_stream(
    cluster: tuple[RedisServer, Emulator, list[ServerProcess]],
) -> None:
    _, emu, (a, b) = cluster
    ws = await _open(a.ws_url)
    welcome = await _hello(ws)
    await _send(ws, _generate("g1", "resume me elsewhere"))
    seen = [await _recv(ws) for _ in range(10)]
    ws.transport.abort()
    ws = await _open(b.ws_url)
    again = await _hello(ws, welcome["session"], seen[-1]["seq"])
    assert again["resumed"] is True and again["session"] == welcome["session"]
    rest = []
    while not rest or rest[-1]["type"] != "done":
        rest.append(await _recv(ws))
    await ws.close()
    _check_stream(emu, seen + rest, "resume me elsewhere")


async def test_a_long_stream_cut_every_few_deltas_resumes_on_a_random_node_each_time(
    cluster: tuple[RedisServer, Emulator, list[ServerProcess]],
) -> None:
    _, emu, nodes = cluster
    rng = random.Random(12)
    prompt = "a long one, cut often"
    emu.configure(tokens=240, token_rate=120.0)
    try:
        ws = await _open(nodes[0].ws_url)
        session = (await _hello(ws))["session"]
        await _send(ws, _generate("long", prompt))
        events: list[Event] = []
        cuts = 0
        while not events or events[-1]["type"] != "done":
            for _ in range(rng.randint(3, 12)):
                events.append(await _recv(ws))
                if events[-1]["type"] == "done":
                    break
            ws.transport.abort()
            cuts += 1
            ws = await _open(rng.choice(nodes).ws_url)
            welcome = await _hello(ws, session, events[-1]["seq"])
            assert welcome["resumed"] is True, (cuts, welcome)
        await ws.close()
        assert cuts >= 10
        _check_stream(emu, events, prompt)  # the expected text depends on the configured length
    finally:
        emu.configure(tokens=60, token_rate=100.0)


async def test_sse_messages_posted_on_one_node_stream_from_another(
    cluster: tuple[RedisServer, Emulator, list[ServerProcess]],
) -> None:
    _, emu, (a, b) = cluster
    async with httpx.AsyncClient(timeout=20) as http:
        opened = (await http.post(f"{a.url}/v1/sessions", json={})).json()
        session = opened["session"]
        events: list[Event] = []
        async with http.stream("GET", f"{b.url}/v1/sessions/{session}/events") as stream:
            assert stream.status_code == 200
            posted = await http.post(
                f"{a.url}/v1/sessions/{session}/messages", json=_generate("g1", "posted on a, read on b")
            )
            assert posted.status_code == 202 and posted.json()["accepted"] == ["g1"]
            async for line in stream.aiter_lines():
                if line.startswith("data: "):
                    events.append(orjson.loads(line[6:]))
                    if events[-1]["type"] == "done":
                        break
        assert (await http.delete(f"{b.url}/v1/sessions/{session}")).status_code == 204
        assert (await http.delete(f"{a.url}/v1/sessions/{session}")).status_code == 404
    _check_stream(emu, events, "posted on a, read on b")


async def test_cancel_on_one_node_closes_the_upstream_of_a_request_running_on_another(
    cluster: tuple[RedisServer, Emulator, list[ServerProcess]],
) -> None:
    _, emu, (a, b) = cluster
    ws = await _open(a.ws_url)
    session = (await _hello(ws))["session"]
    await _send(ws, _generate("g1", "cancel me from b"))
    first = await _recv(ws)
    ws.transport.abort()
    ws = await _open(b.ws_url)
    await _hello(ws, session, first["seq"])
    await _send(ws, {"type": "cancel", "id": "g1"})
    event = await _recv(ws)
    while event["type"] != "done":
        event = await _recv(ws)
    assert event["finish_reason"] == "cancelled"
    await ws.close()
    record = next(r for r in emu.generations() if r.body.get("prompt") == "cancel me from b")
    deadline = time.monotonic() + 10
    while not record.client_closed_early and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        record = next(r for r in emu.generations() if r.body.get("prompt") == "cancel me from b")
    assert record.client_closed_early


async def test_a_transport_attaching_on_another_node_closes_the_old_one_4009(
    cluster: tuple[RedisServer, Emulator, list[ServerProcess]],
) -> None:
    _, _, (a, b) = cluster
    old = await _open(a.ws_url)
    session = (await _hello(old))["session"]
    new = await _open(b.ws_url)
    assert (await _hello(new, session, 0))["resumed"] is True
    with pytest.raises(ConnectionClosed) as closed:
        await asyncio.wait_for(old.recv(), 10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4009
    await new.close()


async def test_a_node_killed_mid_request_has_it_ended_retryable_and_the_session_lives_on(
    cluster: tuple[RedisServer, Emulator, list[ServerProcess]],
) -> None:
    redis, emu, (a, _) = cluster
    victim = start_server(node_env(redis, emu, SLUICE_NODE_ID="victim"))
    try:
        ws = await _open(victim.ws_url)
        session = (await _hello(ws))["session"]
        await _send(ws, _generate("g1", "killed mid-answer"))
        seen = [await _recv(ws) for _ in range(5)]
        victim.signal(signal.SIGKILL)
        killed = time.monotonic()
        ws.transport.abort()
        ws = await _open(a.ws_url)
        again = await _hello(ws, session, seen[-1]["seq"])
        assert again["resumed"] is True
        rest = [await _recv(ws)]
        while rest[-1].get("id") != "g1" or rest[-1]["type"] not in ("done", "error"):
            rest.append(await _recv(ws))
        assert time.monotonic() - killed < 15.0
        assert (
            rest[-1]["type"] == "error" and rest[-1]["code"] == "internal" and rest[-1]["retryable"] is True
        )
        events = seen + rest
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
        await _send(ws, _generate("g2", "after the kill"))
        after = [await _recv(ws)]
        while after[-1]["type"] != "done":
            after.append(await _recv(ws))
        assert after[0]["seq"] == events[-1]["seq"] + 1
        await ws.close()
    finally:
        victim.stop()


def test_two_workers_share_sessions() -> None:
    with run_redis() as redis, start_emulator(token_rate=0.0, tokens=3) as emu:
        server = start_server(node_env(redis, emu, SLUICE_WORKERS="2"))
        try:
            asyncio.run(_reconnect_many(server, 12))
        finally:
            server.stop()


async def _reconnect_many(server: ServerProcess, count: int) -> None:
    ws = await _open(server.ws_url)
    welcome = await _hello(ws)
    session, last_seq = welcome["session"], 0
    for n in range(count):
        await _send(ws, _generate(f"g{n}", f"turn {n}"))
        event = await _recv(ws)
        while event["type"] != "done":
            event = await _recv(ws)
        last_seq = event["seq"]
        await ws.close()
        ws = await _open(server.ws_url)
        again = await _hello(ws, session, last_seq)
        assert again["resumed"] is True, (n, again)
    await ws.close()


async def _until_ready(
    http: httpx.AsyncClient, url: str, ready: bool, within: float = 20.0
) -> httpx.Response:
    deadline = time.monotonic() + within
    while True:
        response = await http.get(f"{url}/ready")
        if (response.status_code == 200) == ready or time.monotonic() > deadline:
            return response
        await asyncio.sleep(0.1)


async def test_redis_down_is_503_and_refused_work_then_restarted_empty_means_resumed_false() -> None:
    with run_redis() as redis, start_emulator(token_rate=0.0, tokens=3) as emu:
        node = start_server(node_env(redis, emu, SLUICE_NODE_ID="lonely"))
        try:
            ws = await _open(node.ws_url)
            session = (await _hello(ws))["session"]
            await _send(ws, _generate("g1", "before the outage"))
            event = await _recv(ws)
            while event["type"] != "done":
                event = await _recv(ws)
            await ws.close()
            async with httpx.AsyncClient(timeout=10) as http:
                redis.stop()
                down = await _until_ready(http, node.url, ready=False)
                assert down.status_code == 503
                store = down.json()["session_store"]
                assert store["reachable"] is False and store["url"] == redis.url
                assert (await http.get(f"{node.url}/health")).status_code == 200
                opened = await http.post(f"{node.url}/v1/sessions", json={})
                assert opened.status_code == 503
                assert opened.json()["error"]["code"] == "upstream_unavailable"
                assert opened.json()["error"]["retryable"] is True
                ws = await _open(node.ws_url)
                await _send(ws, {"type": "hello", "protocol": 1})
                with pytest.raises(ConnectionClosed) as closed:
                    await asyncio.wait_for(ws.recv(), 10)
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012
                assert closed.value.rcvd.reason == "upstream_unavailable"
                redis.restart(empty=True)
                assert (await _until_ready(http, node.url, ready=True)).status_code == 200
            ws = await _open(node.ws_url)
            again = await _hello(ws, session, event["seq"])
            assert again["resumed"] is False and again["session"] != session
            await _send(ws, _generate("g2", "after the outage"))
            events = [await _recv(ws)]
            while events[-1]["type"] != "done":
                events.append(await _recv(ws))
            await ws.close()
            _check_stream(emu, events, "after the outage")  # a new session: seqs from 1
            assert node.process.poll() is None
        finally:
            node.stop()


async def test_a_reader_stalled_on_another_node_through_a_long_fast_stream_resumes_exactly(
    cluster: tuple[RedisServer, Emulator, list[ServerProcess]],
) -> None:
    _, emu, (a, b) = cluster
    prompt = "a long fast answer read from afar"
    emu.configure(tokens=10_050, token_rate=1000.0, lines_per_write=1, split_lines=False)
    try:
        ws = await _open(a.ws_url)
        session = (await _hello(ws))["session"]
        await _send(ws, _generate("fast", prompt))
        await ws.close()
        # max_queue=1: the client stops reading the socket once one frame waits (a stalled reader).
        stalled = await connect(b.ws_url, subprotocols=["sluice.v1"], max_queue=1)  # type: ignore[list-item]
        assert (await _hello(stalled, session, 0))["resumed"] is True
        seen = [await _recv(stalled) for _ in range(50)]
        deadline = time.monotonic() + 90
        record = None
        while record is None or not record.finished:
            assert time.monotonic() < deadline, "the stream did not finish"
            await asyncio.sleep(0.2)
            record = next((r for r in emu.generations() if r.body.get("prompt") == prompt), None)
        stalled.transport.abort()
        ws = await _open(a.ws_url)
        again = await _hello(ws, session, seen[-1]["seq"])
        assert again["resumed"] is True, again
        events = list(seen)
        while events[-1]["type"] != "done":
            events.append(await _recv(ws))
        await ws.close()
        _check_stream(emu, events, prompt)
    finally:
        emu.configure(tokens=60, token_rate=100.0, lines_per_write=2, split_lines=True)


async def test_another_key_cannot_resume_a_session_on_another_node() -> None:
    with run_redis() as redis, start_emulator(token_rate=0.0, tokens=3) as emu:
        keys = {"SLUICE_API_KEYS": "key-one,key-two"}
        a = start_server(node_env(redis, emu, SLUICE_NODE_ID="ka", **keys))
        b = start_server(node_env(redis, emu, SLUICE_NODE_ID="kb", **keys))
        try:
            one = {"Authorization": "Bearer key-one"}
            two = {"Authorization": "Bearer key-two"}
            ws = await connect(a.ws_url, subprotocols=["sluice.v1"], additional_headers=one)  # type: ignore[list-item]
            session = (await _hello(ws))["session"]
            await ws.close()
            ws = await connect(b.ws_url, subprotocols=["sluice.v1"], additional_headers=two)  # type: ignore[list-item]
            other = await _hello(ws, session, 0)
            assert other["resumed"] is False and other["session"] != session
            await ws.close()
            async with httpx.AsyncClient(timeout=10) as http:
                events = await http.get(f"{b.url}/v1/sessions/{session}/events", headers=two)
                assert events.status_code == 404
                assert (await http.delete(f"{b.url}/v1/sessions/{session}", headers=two)).status_code == 404
            ws = await connect(b.ws_url, subprotocols=["sluice.v1"], additional_headers=one)  # type: ignore[list-item]
            assert (await _hello(ws, session, 0))["resumed"] is True
            await ws.close()
        finally:
            a.stop()
            b.stop()


def _oldest_logged(redis: RedisServer, session: str) -> int:
    """The seq of the oldest event the session's log in Redis holds (0: none)."""
    entries = redis.command("XRANGE", f"sluice:{{{session}}}:log", "-", "+", "COUNT", "1")
    assert isinstance(entries, list)
    if not entries:
        return 0
    entry_id = entries[0][0]
    assert isinstance(entry_id, bytes)
    return int(entry_id.split(b"-")[0])


async def test_an_ack_trims_the_log_in_redis_so_a_resume_below_it_is_a_new_session_on_any_node(
    cluster: tuple[RedisServer, Emulator, list[ServerProcess]],
) -> None:
    redis, emu, (a, b) = cluster
    ws = await _open(a.ws_url)
    session = (await _hello(ws))["session"]
    await _send(ws, _generate("g1", "acknowledged in part"))
    events = [await _recv(ws)]
    while events[-1]["type"] != "done":
        events.append(await _recv(ws))
    assert _oldest_logged(redis, session) == 1 and len(events) > 20
    acked = 20
    await _send(ws, {"type": "ack", "seq": acked})
    deadline = time.monotonic() + 5
    while _oldest_logged(redis, session) != acked + 1:  # with the home's next write
        assert time.monotonic() < deadline, (
            f"the log in Redis still starts at {_oldest_logged(redis, session)}"
        )
        await asyncio.sleep(0.02)
    await ws.close()
    for node in (a, b):  # the home answers from its memory, the other node from Redis: alike
        ws = await _open(node.ws_url)
        below = await _hello(ws, session, acked - 1)
        assert below["resumed"] is False and below["session"] != session
        await ws.close()
    ws = await _open(b.ws_url)
    again = await _hello(ws, session, acked)
    assert again["resumed"] is True and again["last_seq"] == events[-1]["seq"]
    rest = [await _recv(ws) for _ in range(len(events) - acked)]
    await ws.close()
    assert rest == events[acked:]
    _check_stream(emu, events, "acknowledged in part")
