"""The cluster session registry in-process: two nodes, one real redis-server, fake backends.
Resume on the other node mid-stream, cancel and takeover across nodes, ownership, ending from
either node, a node that stops mid-request, and Redis restarted empty."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from protocol.close import CloseCode
from protocol.errors import ErrorCode
from protocol.messages import Cancel, Generate
from protocol.session import Accepted, Refused
from server.cluster.eventlog import read_after
from server.sessions import NotAttached
from tests.cluster.inprocess import InProcessNode, collect, kill, outbox, start_node, terminal, welcome
from tests.server.fakes import FakeRegistry, ScriptedGenerator
from tests.support.redis_server import RedisServer

PIECES = [f"w{n} " for n in range(40)]


@pytest.fixture
async def pair(
    redis_server: RedisServer,
) -> AsyncIterator[tuple[InProcessNode, InProcessNode, ScriptedGenerator]]:
    if not redis_server.running:
        redis_server.start()
    redis_server.command("FLUSHALL")
    generator = ScriptedGenerator(pieces=PIECES, delay_s=0.01)
    a = await start_node(redis_server.url, "n_a", FakeRegistry(generator))
    b = await start_node(redis_server.url, "n_b", FakeRegistry(generator))
    try:
        yield a, b, generator
    finally:
        await a.close()
        await b.close()


def _text(events: list[dict[str, object]], request_id: str) -> str:
    return "".join(str(e["text"]) for e in events if e["type"] == "delta" and e["id"] == request_id)


def _seqs(events: list[dict[str, object]]) -> list[int]:
    return [int(str(e["seq"])) for e in events if "seq" in e]


async def test_a_session_resumes_on_the_other_node_mid_stream_exactly(
    pair: tuple[InProcessNode, InProcessNode, ScriptedGenerator],
) -> None:
    a, b, _ = pair
    box_a = outbox()
    connected = await a.sessions.connect(box_a, key_id="k", welcome=welcome)
    session = connected.runtime.id
    connected.runtime.handle(Generate(type="generate", id="g1", prompt="hi"))
    first = await collect(box_a, lambda ev: len([e for e in ev if e["type"] == "delta"]) >= 10)
    assert first[0]["type"] == "welcome" and first[0]["resumed"] is False
    seen = _seqs(first)
    connected.runtime.detach(box_a)
    box_b = outbox()
    resumed = await b.sessions.connect(box_b, key_id="k", welcome=welcome, resume=session, last_seq=seen[-1])
    assert resumed.resumed and resumed.runtime.id == session
    rest = await collect(box_b, terminal("g1"))
    assert rest[0]["type"] == "welcome" and rest[0]["resumed"] is True
    events = first[1:] + rest[1:]
    assert _seqs(events) == list(range(1, len(events) + 1))
    assert _text(events, "g1") == "".join(PIECES)
    assert events[-1]["type"] == "done"


async def test_cancel_on_the_other_node_closes_the_upstream(
    pair: tuple[InProcessNode, InProcessNode, ScriptedGenerator],
) -> None:
    a, b, generator = pair
    box_a = outbox()
    connected = await a.sessions.connect(box_a, key_id="k", welcome=welcome)
    connected.runtime.handle(Generate(type="generate", id="g1", prompt="hi"))
    await collect(box_a, lambda ev: any(e["type"] == "delta" for e in ev))
    connected.runtime.detach(box_a)
    box_b = outbox()
    on_b = await b.sessions.connect(
        box_b, key_id="k", welcome=welcome, resume=connected.runtime.id, last_seq=0
    )
    on_b.runtime.handle(Cancel(type="cancel", id="g1"))
    events = await collect(box_b, terminal("g1"))
    assert events[-1]["type"] == "done" and events[-1]["finish_reason"] == "cancelled"
    for _ in range(100):
        if generator.records[0].closed_early:
            break
        await asyncio.sleep(0.02)
    assert generator.records[0].closed_early


async def test_a_transport_attaching_on_another_node_takes_over(
    pair: tuple[InProcessNode, InProcessNode, ScriptedGenerator],
) -> None:
    a, b, _ = pair
    box_a = outbox()
    connected = await a.sessions.connect(box_a, key_id="k", welcome=welcome)
    box_b = outbox()
    await b.sessions.connect(box_b, key_id="k", welcome=welcome, resume=connected.runtime.id, last_seq=0)
    await collect(box_a, lambda ev: False, within=5.0)
    assert box_a.close_code is CloseCode.TAKEN_OVER
    assert not box_b.closed
    # And back: the transport on b is the one closed now.
    box_a2 = outbox()
    await a.sessions.connect(box_a2, key_id="k", welcome=welcome, resume=connected.runtime.id, last_seq=0)
    await collect(box_b, lambda ev: False, within=5.0)
    assert box_b.close_code is CloseCode.TAKEN_OVER


async def test_a_late_announcement_of_an_older_transport_never_closes_a_newer_one(
    pair: tuple[InProcessNode, InProcessNode, ScriptedGenerator],
) -> None:
    a, b, _ = pair
    first = outbox()
    session = (await a.sessions.connect(first, key_id="k", welcome=welcome)).runtime.id
    # b's announcement to the home (``att``) is held back until the client has moved on.
    release = asyncio.Event()
    send = b.node.send

    async def late(node_id: str, message: dict[str, Any]) -> bool:
        if message.get("op") == "att":
            await release.wait()
        return await send(node_id, message)

    b.node.send = late  # type: ignore[method-assign]
    on_b = outbox()
    moved = await b.sessions.connect(on_b, key_id="k", welcome=welcome, resume=session, last_seq=0)
    assert moved.resumed
    moved.runtime.detach(on_b)  # the client cut it at once and reattaches on the home
    on_a = outbox()
    back = await a.sessions.connect(on_a, key_id="k", welcome=welcome, resume=session, last_seq=0)
    assert back.resumed
    release.set()
    await asyncio.sleep(0.3)  # b's late ``att`` reaches the home now
    assert first.close_code is CloseCode.TAKEN_OVER
    assert not on_a.closed
    assert back.runtime.current == back.runtime.token and back.runtime.detached_since is None


async def test_a_transport_closes_for_a_newer_notice_only_and_one_that_lost_never_goes_live(
    pair: tuple[InProcessNode, InProcessNode, ScriptedGenerator],
) -> None:
    a, b, _ = pair
    session = (await a.sessions.connect(outbox(), key_id="k", welcome=welcome)).runtime.id
    on_b = outbox()
    view = (await b.sessions.connect(on_b, key_id="k", welcome=welcome, resume=session, last_seq=0)).runtime
    assert view.token is not None and view.token.startswith("n_b/")
    generation = int(view.token.rpartition("/")[2])
    view.on_feed(f"!A n_a/{generation - 1}".encode())  # an older transport's notice, arriving late
    assert not on_b.closed
    view.on_feed(f"!A n_a/{generation + 1}".encode())  # a newer one attached on a
    assert on_b.close_code is CloseCode.TAKEN_OVER
    # An attach that finishes after a newer transport was announced closes at once, never live.
    stale = outbox()
    view.begin_attach()
    view.complete_attach(stale, f"n_b/{generation}", [], 0, None)
    assert stale.close_code is CloseCode.TAKEN_OVER and view.outbox is not stale


async def test_another_key_cannot_resume_a_session_on_another_node(
    pair: tuple[InProcessNode, InProcessNode, ScriptedGenerator],
) -> None:
    a, b, _ = pair
    connected = await a.sessions.connect(outbox(), key_id="k1", welcome=welcome)
    other = await b.sessions.connect(
        outbox(), key_id="k2", welcome=welcome, resume=connected.runtime.id, last_seq=0
    )
    assert not other.resumed and other.runtime.id != connected.runtime.id
    assert await b.sessions.find(connected.runtime.id, "k2") is None
    assert (
        await b.sessions.attach(outbox(), session_id=connected.runtime.id, key_id="k2", last_seq=0)
        is NotAttached.UNKNOWN
    )


async def test_a_resume_past_what_was_logged_is_a_new_session(
    pair: tuple[InProcessNode, InProcessNode, ScriptedGenerator],
) -> None:
    a, b, _ = pair
    connected = await a.sessions.connect(outbox(), key_id="k", welcome=welcome)
    again = await b.sessions.connect(
        outbox(), key_id="k", welcome=welcome, resume=connected.runtime.id, last_seq=5
    )
    assert not again.resumed
    sse = await b.sessions.attach(outbox(), session_id=connected.runtime.id, key_id="k", last_seq=5)
    assert sse is NotAttached.INCOMPLETE


async def test_ending_from_the_other_node_ends_it_everywhere(
    pair: tuple[InProcessNode, InProcessNode, ScriptedGenerator],
) -> None:
    a, b, generator = pair
    box_a = outbox()
    connected = await a.sessions.connect(box_a, key_id="k", welcome=welcome)
    connected.runtime.handle(Generate(type="generate", id="g1", prompt="hi"))
    await collect(box_a, lambda ev: any(e["type"] == "delta" for e in ev))
    assert await b.sessions.end(connected.runtime.id)
    await collect(box_a, lambda ev: False, within=5.0)
    assert box_a.closed
    assert generator.records[0].closed_early
    assert await b.sessions.find(connected.runtime.id, "k") is None
    assert not await b.sessions.end(connected.runtime.id)


async def test_messages_posted_on_one_node_stream_on_the_other(
    pair: tuple[InProcessNode, InProcessNode, ScriptedGenerator],
) -> None:
    a, b, _ = pair
    opened = await a.sessions.open_or_resume(key_id="k", welcome=welcome)
    stream = outbox()
    attached = await a.sessions.attach(stream, session_id=opened.session, key_id="k", last_seq=0)
    assert not isinstance(attached, NotAttached)
    on_b = await b.sessions.find(opened.session, "k")
    assert on_b is not None
    on_b.handle(Generate(type="generate", id="g1", prompt="hi"))
    events = await collect(stream, terminal("g1"))
    assert _text(events, "g1") == "".join(PIECES)
    again = await b.sessions.open_or_resume(key_id="k", welcome=welcome, resume=opened.session, last_seq=3)
    assert again.resumed and again.session == opened.session


async def test_a_node_that_stops_mid_request_has_it_ended_retryable_and_the_session_lives_on(
    pair: tuple[InProcessNode, InProcessNode, ScriptedGenerator],
) -> None:
    a, b, generator = pair
    generator.delay_s = 0.05
    box_a = outbox()
    connected = await a.sessions.connect(box_a, key_id="k", welcome=welcome)
    session = connected.runtime.id
    connected.runtime.handle(Generate(type="generate", id="g1", prompt="hi"))
    first = await collect(box_a, lambda ev: len([e for e in ev if e["type"] == "delta"]) >= 3)
    # A dies as a SIGKILL looks from Redis: no more writes, no heartbeat, no cleanup.
    await kill(a)
    box_b = outbox()
    loop = asyncio.get_running_loop()
    started = loop.time()
    on_b = await b.sessions.connect(
        box_b, key_id="k", welcome=welcome, resume=session, last_seq=_seqs(first)[-1]
    )
    assert on_b.resumed
    rest = await collect(box_b, terminal("g1"), within=15.0)
    assert loop.time() - started < 15.0
    assert rest[-1]["type"] == "error" and rest[-1]["code"] == "internal" and rest[-1]["retryable"] is True
    events = first[1:] + rest[1:]
    assert _seqs(events) == list(range(1, len(events) + 1))
    generator.delay_s = 0.0
    on_b.runtime.handle(Generate(type="generate", id="g2", prompt="again"))
    after = await collect(box_b, terminal("g2"))
    assert _text(after, "g2") == "".join(PIECES)
    assert _seqs(after) == list(range(events[-1]["seq"] + 1, events[-1]["seq"] + 1 + len(after)))  # type: ignore[operator]


async def test_after_redis_restarted_empty_a_resume_is_a_new_session(
    pair: tuple[InProcessNode, InProcessNode, ScriptedGenerator], redis_server: RedisServer
) -> None:
    a, b, _ = pair
    connected = await a.sessions.connect(outbox(), key_id="k", welcome=welcome)
    redis_server.restart(empty=True)
    for _ in range(100):
        if a.store.healthy and b.store.healthy:
            break
        await asyncio.sleep(0.05)
    for node in (a, b):
        again = await node.sessions.connect(
            outbox(), key_id="k", welcome=welcome, resume=connected.runtime.id, last_seq=0
        )
        assert not again.resumed


async def test_messages_handled_on_a_node_that_is_not_the_home_say_what_became_of_each(
    pair: tuple[InProcessNode, InProcessNode, ScriptedGenerator],
) -> None:
    a, b, _ = pair
    opened = await a.sessions.open_or_resume(key_id="k", welcome=welcome)
    stream = outbox()
    assert not isinstance(
        await a.sessions.attach(stream, session_id=opened.session, key_id="k", last_seq=0), NotAttached
    )
    on_b = await b.sessions.find(opened.session, "k")
    assert on_b is not None and on_b.runtime is None  # the home is a
    outcomes = await on_b.handle_all(
        [Generate(type="generate", id="g1", prompt="hi"), Generate(type="generate", id="g1", prompt="again")]
    )
    assert isinstance(outcomes[0], Accepted) and outcomes[0].request.id == "g1"
    assert isinstance(outcomes[1], Refused) and outcomes[1].event.code is ErrorCode.DUPLICATE_ID
    events = await collect(stream, terminal("g1"))
    refusal = next(e for e in events if e["type"] == "error")
    assert refusal["seq"] == outcomes[1].event.seq and refusal["ref"] == "g1"
    assert _text(events, "g1") == "".join(PIECES)


async def test_a_session_whose_transport_node_died_expires_at_its_home(redis_server: RedisServer) -> None:
    if not redis_server.running:
        redis_server.start()
    redis_server.command("FLUSHALL")
    a = await start_node(redis_server.url, "n_a", FakeRegistry(), ttl_s=0.4)
    b = await start_node(redis_server.url, "n_b", FakeRegistry(), ttl_s=0.4)
    try:
        opened = await a.sessions.open_or_resume(key_id="k", welcome=welcome)
        on_b = await b.sessions.connect(
            outbox(), key_id="k", welcome=welcome, resume=opened.session, last_seq=0
        )
        assert on_b.resumed
        await asyncio.sleep(1.0)  # attached on b: well past the TTL, and alive
        assert await a.sessions.find(opened.session, "k") is not None
        await kill(b)  # b never says its transport left
        for _ in range(100):
            if await a.sessions.find(opened.session, "k") is None:
                break
            await asyncio.sleep(0.05)
        assert await a.sessions.find(opened.session, "k") is None
    finally:
        await a.close()
        await b.close()


async def test_what_a_killed_home_logged_but_the_feed_never_brought_still_reaches_the_transport_elsewhere(
    pair: tuple[InProcessNode, InProcessNode, ScriptedGenerator],
) -> None:
    a, b, _ = pair
    session = (await a.sessions.connect(outbox(), key_id="k", welcome=welcome)).runtime.id
    box_b = outbox()
    view = (await b.sessions.connect(box_b, key_id="k", welcome=welcome, resume=session, last_seq=0)).runtime
    # a writes every event to the log, but none of them reaches b by the feed (lost on the way);
    # only the notices do.
    heard = b.node.on_feed
    assert heard is not None
    b.node.on_feed = lambda payload: heard(payload) if b"\n!" in payload else None
    view.handle(Generate(type="generate", id="g1", prompt="hi"))
    for _ in range(200):
        logged = await read_after(b.store, session, 0)
        if logged and logged[-1].type == "done":
            break
        await asyncio.sleep(0.05)
    assert logged and logged[-1].type == "done"
    await kill(a)
    events = (await collect(box_b, terminal("g1"), within=15.0))[1:]
    assert _text(events, "g1") == "".join(PIECES)
    assert _seqs(events) == list(range(1, len(events) + 1))
