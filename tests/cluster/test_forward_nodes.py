"""A client message forwarded to a session's home that dies around taking it, from the outside:
real ``sluice serve`` nodes on loopback, one real redis-server, the Ollama emulator.

Each victim home connects as a Redis user of its own, so the test can take rights from it while
it still hears and answers its control channel: without the session logs' keys it takes the
forwarded request and runs it upstream, but every write of its log is refused (and retried) until
it is SIGKILLed, deterministically between taking the request and logging it; without scripting
it cannot even take the request. Either way the request ends exactly once within 15 s (PROTOCOL
§2): ``error`` ``internal``, ``retryable: true`` when the dead home took it, a run at the new home
when it never did. An SSE ``POST`` to a stalled home, or to one that can never take it, is
answered within a bound (12 s: accepted at the next home, or ``upstream_unavailable``)."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import orjson
import pytest

from tests.cluster.test_nodes import Event, _generate, _hello, _open, _recv, _send, node_env
from tests.support.ollama_emulator import Emulator, start_emulator
from tests.support.redis_server import RedisServer, run_redis
from tests.support.server import ServerProcess, start_server

Cluster = tuple[RedisServer, Emulator, ServerProcess]
USER, PASSWORD = "home", "home-secret"
# Every key a node uses but the sessions' logs (``sluice:{s_…}:log``).
NO_LOGS = (
    "~sluice:node*",
    "~sluice:ticket*",
    "~sluice:limits*",
    "~sluice:respon*",
    "~*:meta",
    "~*:subs",
    "~*:hist",
)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with run_redis() as redis, start_emulator(token_rate=50.0, tokens=40) as emu:
        node = start_server(node_env(redis, emu, SLUICE_NODE_ID="fa"))
        try:
            yield redis, emu, node
        finally:
            node.stop()


def _victim(redis: RedisServer, emu: Emulator, name: str) -> ServerProcess:
    """A node whose Redis user the test can take rights from."""
    redis.command("ACL", "SETUSER", USER, "reset", "on", f">{PASSWORD}", "~*", "&*", "+@all")
    url = f"redis://{USER}:{PASSWORD}@{redis.host}:{redis.port}/0"
    return start_server({**node_env(redis, emu, SLUICE_NODE_ID=name), "SLUICE_REDIS_URL": url})


async def _upstream_saw(emu: Emulator, prompt: str, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not _runs(emu, prompt):
        assert time.monotonic() < deadline, "the home never ran the forwarded request"
        await asyncio.sleep(0.02)


def _runs(emu: Emulator, prompt: str) -> int:
    return sum(1 for r in emu.generations() if r.body.get("prompt") == prompt)


async def _until_end(ws: object, request_id: str) -> list[Event]:
    events = [await _recv(ws)]  # type: ignore[arg-type]
    while events[-1].get("id") != request_id or events[-1]["type"] not in ("done", "error"):
        events.append(await _recv(ws))  # type: ignore[arg-type]
    return events


async def _homed_on(victim: ServerProcess) -> str:
    ws = await _open(victim.ws_url)
    session: str = (await _hello(ws))["session"]
    await ws.close()
    return session


async def test_a_request_the_home_took_and_died_before_logging_ends_retryable_once(cluster: Cluster) -> None:
    redis, emu, a = cluster
    victim = _victim(redis, emu, "fvictim")
    try:
        session = await _homed_on(victim)
        ws = await _open(a.ws_url)  # the transport on a, the home on the victim
        assert (await _hello(ws, session, 0))["resumed"] is True
        redis.command("ACL", "SETUSER", USER, "resetkeys", *NO_LOGS)  # the home can no longer log
        prompt = "forwarded, then the home died"
        await _send(ws, _generate("g1", prompt))
        await _upstream_saw(emu, prompt)  # the home took it (and runs it), and logged nothing
        victim.signal(signal.SIGKILL)
        killed = time.monotonic()
        event = await _recv(ws, within=20.0)
        assert time.monotonic() - killed < 15.0
        assert event["type"] == "error" and event["id"] == "g1", event
        assert event["code"] == "internal" and event["retryable"] is True
        # The session lives on at its new home; the lost request was not run a second time.
        await _send(ws, _generate("g2", "after the home died"))
        after = await _until_end(ws, "g2")
        assert all(e.get("id") == "g2" for e in after), after
        assert after[-1]["type"] == "done" and after[0]["seq"] == event["seq"] + 1
        assert _runs(emu, prompt) == 1
        await ws.close()
    finally:
        victim.stop()


async def test_a_request_the_home_never_took_runs_once_at_the_next_home(cluster: Cluster) -> None:
    redis, emu, a = cluster
    victim = _victim(redis, emu, "fvictim2")
    try:
        session = await _homed_on(victim)
        ws = await _open(a.ws_url)
        assert (await _hello(ws, session, 0))["resumed"] is True
        redis.command("ACL", "SETUSER", USER, "-@scripting")  # it can neither take nor log
        prompt = "never taken by the home"
        await _send(ws, _generate("g1", prompt))
        await asyncio.sleep(0.5)  # a few forwards refused (the home could not take them)
        assert _runs(emu, prompt) == 0
        victim.signal(signal.SIGKILL)
        killed = time.monotonic()
        events = await _until_end(ws, "g1")
        assert time.monotonic() - killed < 15.0
        assert events[-1]["type"] == "done", events
        assert [e["type"] for e in events if e.get("id") == "g1"].count("done") == 1
        assert _runs(emu, prompt) == 1
        await ws.close()
    finally:
        victim.stop()


async def _sse_events(http: httpx.AsyncClient, url: str) -> AsyncIterator[Event]:
    async with http.stream("GET", url) as stream:
        assert stream.status_code == 200
        async for line in stream.aiter_lines():
            if line.startswith("data: "):
                yield orjson.loads(line[6:])


async def test_an_sse_post_to_a_stalled_home_is_answered_within_a_bound(cluster: Cluster) -> None:
    redis, emu, a = cluster
    victim = _victim(redis, emu, "fvictim3")
    try:
        async with httpx.AsyncClient(timeout=30) as http:
            session = (await http.post(f"{victim.url}/v1/sessions", json={})).json()["session"]
            events = _sse_events(http, f"{a.url}/v1/sessions/{session}/events")
            reading = asyncio.ensure_future(anext(events))
            await asyncio.sleep(0.3)  # the stream attached on a
            victim.signal(signal.SIGSTOP)  # hears nothing from now on, answers nothing
            prompt = "posted while the home stalled"
            posted_at = time.monotonic()
            posted = await http.post(f"{a.url}/v1/sessions/{session}/messages", json=_generate("g1", prompt))
            assert time.monotonic() - posted_at < 15.0
            assert posted.status_code == 202 and posted.json()["accepted"] == ["g1"], posted.text
            seen = [await asyncio.wait_for(reading, 20)]
            while seen[-1].get("id") != "g1" or seen[-1]["type"] not in ("done", "error"):
                seen.append(await asyncio.wait_for(anext(events), 20))
            assert seen[-1]["type"] == "done", seen
            assert _runs(emu, prompt) == 1
            await events.aclose()
    finally:
        victim.signal(signal.SIGKILL)
        victim.stop()


async def test_an_sse_post_to_a_home_that_never_takes_it_is_refused_retryable_within_the_bound(
    cluster: Cluster,
) -> None:
    redis, emu, a = cluster
    victim = _victim(redis, emu, "fvictim4")
    try:
        async with httpx.AsyncClient(timeout=30) as http:
            session = (await http.post(f"{victim.url}/v1/sessions", json={})).json()["session"]
            redis.command("ACL", "SETUSER", USER, "-@scripting")  # alive, and it can never take it
            prompt = "posted to a home that cannot take it"
            posted_at = time.monotonic()
            posted = await http.post(f"{a.url}/v1/sessions/{session}/messages", json=_generate("g1", prompt))
            waited = time.monotonic() - posted_at
            assert 10.0 < waited < 15.0, waited
            assert posted.status_code == 503, posted.text
            assert "upstream_unavailable" in posted.text and _runs(emu, prompt) == 0
            # Nothing of it is left marked (a resend is a new request, not a leftover to end).
            meta = redis.command("HGETALL", f"sluice:{{{session}}}:meta")
            assert isinstance(meta, list) and not [f for f in meta[::2] if f.startswith(b"r:")], meta
    finally:
        victim.stop()


async def _marked(redis: RedisServer, session: str, request_id: str, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while redis.command("HGET", f"sluice:{{{session}}}:meta", f"r:{request_id}") is None:
        assert time.monotonic() < deadline, "the forwarding node never marked the request"
        await asyncio.sleep(0.02)


async def test_a_request_whose_forwarding_node_died_before_the_home_took_it_ends_retryable_once(
    cluster: Cluster,
) -> None:
    redis, emu, a = cluster
    victim = _victim(redis, emu, "fvictim5")
    try:
        session = await _homed_on(a)
        ws = await _open(victim.ws_url)  # the transport on the victim, the home on a
        assert (await _hello(ws, session, 0))["resumed"] is True
        # It still hears its own channels, and can no longer publish to a's: it marks the
        # request for a, and its forward never reaches a.
        redis.command("ACL", "SETUSER", USER, "resetchannels", "&sluice:node:fvictim5:*")
        prompt = "marked, then its forwarder died"
        await _send(ws, _generate("g1", prompt))
        await _marked(redis, session, "g1")
        victim.signal(signal.SIGKILL)
        killed = time.monotonic()
        resumed = await _open(a.ws_url)
        assert (await _hello(resumed, session, 0))["resumed"] is True
        event = await _recv(resumed, within=20.0)
        assert time.monotonic() - killed < 15.0
        assert event["type"] == "error" and event["id"] == "g1", event
        assert event["code"] == "internal" and event["retryable"] is True
        assert redis.command("HGET", f"sluice:{{{session}}}:meta", "r:g1") is None
        # The session goes on; the lost request never ran, and ends only once.
        await _send(resumed, _generate("g2", "after the forwarder died"))
        after = await _until_end(resumed, "g2")
        assert all(e.get("id") == "g2" for e in after), after
        assert after[-1]["type"] == "done" and after[0]["seq"] == event["seq"] + 1
        assert _runs(emu, prompt) == 0
        await resumed.close()
    finally:
        victim.stop()
