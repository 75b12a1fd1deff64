"""Cluster mode from the outside, where one node alone used to differ: real ``sluice serve`` nodes
on loopback, one real redis-server, the Ollama emulator. A node's memory for logs bounded by
``SLUICE_MAX_LOG_BYTES`` (detached sessions' copies shed first) while every resume, on the same
node or the other, stays exact; ``history: true`` turns going on at a new home after the old one
was SIGKILLed; a SIGKILLed node taken off the subs of the sessions whose transports it held."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator

import pytest
from websockets.asyncio.client import ClientConnection

from tests.cluster.test_nodes import MODEL, Event, _hello, _open, _recv, _send, node_env
from tests.support.ollama_emulator import Emulator, start_emulator
from tests.support.redis_server import RedisServer, run_redis
from tests.support.server import ServerProcess, start_server

# A node's bound on log memory: about three of the sessions below (300 tokens, ~70 deltas each).
LOG_BYTES = 40_000
SHED = "event logs past max_log_bytes"

Cluster = tuple[RedisServer, Emulator, list[ServerProcess]]


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with run_redis() as redis, start_emulator(token_rate=2000.0, tokens=300) as emu:
        nodes: list[ServerProcess] = []
        try:
            for name in ("ga", "gb"):
                env = node_env(redis, emu, SLUICE_NODE_ID=name, SLUICE_MAX_LOG_BYTES=str(LOG_BYTES))
                nodes.append(start_server(env))
            yield redis, emu, nodes
        finally:
            for node in nodes:
                node.stop()


async def _until_done(ws: ClientConnection, request_id: str) -> list[Event]:
    events = [await _recv(ws)]
    while events[-1].get("id") != request_id or events[-1]["type"] not in ("done", "error"):
        events.append(await _recv(ws))
    return events


async def _generate(
    ws: ClientConnection, request_id: str, prompt: str, *, history: bool = False
) -> list[Event]:
    message = {"type": "generate", "id": request_id, "model": MODEL, "prompt": prompt, "history": history}
    await _send(ws, message)
    return await _until_done(ws, request_id)


def _reply(events: list[Event], request_id: str) -> str:
    return "".join(e["text"] for e in events if e["type"] == "delta" and e["id"] == request_id)


def _expected(emu: Emulator, prompt: str) -> str:
    record = next(r for r in emu.generations() if r.body.get("prompt") == prompt)
    return emu.expected_text(record.body)


def _check(emu: Emulator, events: list[Event], prompts: dict[str, str]) -> None:
    """``events`` are a session's whole log: seqs 1.., each request's exact text, then done."""
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    for request_id, prompt in prompts.items():
        assert _reply(events, request_id) == _expected(emu, prompt), request_id
        assert [e["finish_reason"] for e in events if e["type"] == "done" and e["id"] == request_id] == [
            "stop"
        ]


async def test_log_memory_past_the_bound_sheds_detached_sessions_and_every_resume_stays_exact(
    cluster: Cluster,
) -> None:
    redis, emu, (a, b) = cluster
    # Six sessions homed on a, 300 deltas each: about twice a's bound in memory.
    sessions: list[tuple[str, list[Event], dict[str, str]]] = []
    held: list[ClientConnection] = []
    for n in range(6):
        ws = await _open(a.ws_url)
        session = (await _hello(ws))["session"]
        prompts = {f"g{n}": f"fill the log memory {n}"}
        sessions.append((session, await _generate(ws, f"g{n}", prompts[f"g{n}"]), prompts))
        if n < 4:
            await ws.close()  # detached: its copy in a's memory is the first to go
        else:
            held.append(ws)
    # The attached ones go on past the bound again: what is shed now is detached sessions' first,
    # then the attached ones' oldest events.
    for n, ws in enumerate(held, 4):
        session, events, prompts = sessions[n]
        prompts[f"more{n}"] = f"more for the attached {n}"
        events += await _generate(ws, f"more{n}", prompts[f"more{n}"])
        await ws.close()
    assert SHED in a.log_text(), "the bound was never reached: the test proves nothing"
    # The first detached session's copy went first: its home replays it from Redis.
    reads = _log_reads(redis)
    await _resumed_exactly(emu, a, *sessions[0])
    assert _log_reads(redis) > reads, "the home replayed from memory: nothing was shed"
    # Every session resumes from 0, exactly, on its home and on the other node.
    for n, (session, events, prompts) in enumerate(sessions):
        for node in (a, b) if n % 2 else (b, a):
            await _resumed_exactly(emu, node, session, events, prompts)


def _log_reads(redis: RedisServer) -> int:
    """How many XRANGE Redis has run (a replay read from a session's log)."""
    stats = redis.command("INFO", "commandstats")
    assert isinstance(stats, bytes)
    for line in stats.decode().splitlines():
        if line.startswith("cmdstat_xrange:"):
            return int(line.split("calls=")[1].split(",")[0])
    return 0


async def _resumed_exactly(
    emu: Emulator, node: ServerProcess, session: str, events: list[Event], prompts: dict[str, str]
) -> None:
    """A resume of ``session`` from 0 on ``node`` replays exactly ``events``."""
    ws = await _open(node.ws_url)
    welcome = await _hello(ws, session, 0)
    assert welcome["resumed"] is True and welcome["session"] == session, node.port
    replayed = [await _recv(ws) for _ in range(len(events))]
    assert replayed == events, node.port
    _check(emu, replayed, prompts)
    await ws.close()


async def test_history_turns_go_on_at_a_new_home_after_the_old_one_was_killed(cluster: Cluster) -> None:
    redis, emu, (a, _) = cluster
    victim = start_server(node_env(redis, emu, SLUICE_NODE_ID="gvictim"))
    try:
        ws = await _open(victim.ws_url)
        session = (await _hello(ws))["session"]
        first = await _generate(ws, "h1", "the first question", history=True)
        second = await _generate(ws, "h2", "the second question", history=True)
        victim.signal(signal.SIGKILL)
        ws.transport.abort()
        ws = await _open(a.ws_url)
        again = await _hello(ws, session, second[-1]["seq"])
        assert again["resumed"] is True
        third = await _generate(ws, "h3", "the third question", history=True)
        assert third[-1]["type"] == "done" and third[0]["seq"] == second[-1]["seq"] + 1
        await ws.close()
    finally:
        victim.stop()
    record = next(
        r
        for r in emu.generations()
        if (r.body.get("messages") or [{}])[-1].get("content") == "the third question"
    )
    turns = [(turn["role"], turn["content"]) for turn in record.body["messages"]]
    assert turns == [
        ("user", "the first question"),
        ("assistant", _reply(first, "h1")),
        ("user", "the second question"),
        ("assistant", _reply(second, "h2")),
        ("user", "the third question"),
    ]


async def test_a_killed_node_is_taken_off_the_subs_of_the_sessions_it_held_transports_of(
    cluster: Cluster,
) -> None:
    redis, emu, (a, _) = cluster
    victim = start_server(node_env(redis, emu, SLUICE_NODE_ID="gdead"))
    try:
        ws = await _open(a.ws_url)
        session = (await _hello(ws))["session"]
        await ws.close()
        held = await _open(victim.ws_url)  # homed on a, its transport on the victim
        assert (await _hello(held, session, 0))["resumed"] is True
        subs = f"sluice:{{{session}}}:subs"
        assert b"gdead" in _members(redis, subs)
        victim.signal(signal.SIGKILL)
        held.transport.abort()
        deadline = time.monotonic() + 20
        while b"gdead" in _members(redis, subs):
            assert time.monotonic() < deadline, "the dead node is still in the session's subs"
            await asyncio.sleep(0.2)
        assert redis.command("EXISTS", "sluice:node:gdead:subs") == 0
        # The session lives on: a transport on its home streams as ever.
        ws = await _open(a.ws_url)
        assert (await _hello(ws, session, 0))["resumed"] is True
        prompts = {"after": "after the listener died"}
        _check(emu, await _generate(ws, "after", prompts["after"]), prompts)
        await ws.close()
    finally:
        victim.stop()


def _members(redis: RedisServer, key: str) -> list[bytes]:
    members = redis.command("SMEMBERS", key)
    assert isinstance(members, list)
    return [m for m in members if isinstance(m, bytes)]
