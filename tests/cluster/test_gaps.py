"""Cluster mode in-process where one node alone used to differ: two nodes, one real redis-server,
fake backends. The home's log memory within the node's budget (detached sessions' copies shed
first, their resumes read from Redis, exactly); a new home's ``history: true`` conversation,
exactly the turns whose ``done`` the log holds; a node taken for dead that comes back joins the
subs of its transports' sessions again."""

from __future__ import annotations

import asyncio

import orjson

from protocol.messages import ChatMessage, Delta, Done, Error, Generate, Timings, Usage
from server.cluster import homes
from server.cluster.histories import load
from server.cluster.scripts import history_key, subs_key
from tests.cluster.inprocess import collect, kill, outbox, start_node, terminal, welcome
from tests.server.fakes import FakeRegistry, ScriptedGenerator
from tests.support.redis_server import RedisServer

PIECES = [f"w{n} " for n in range(60)]


def _fresh(redis_server: RedisServer) -> None:
    if not redis_server.running:
        redis_server.start()
    redis_server.command("FLUSHALL")


async def test_past_the_budget_detached_copies_go_first_and_their_resume_reads_redis(
    redis_server: RedisServer,
) -> None:
    _fresh(redis_server)
    generator = ScriptedGenerator(pieces=PIECES, delay_s=0.003)
    # ~60 deltas and a done a request: about 7 kB in memory; the budget holds about two.
    a = await start_node(redis_server.url, "n_a", FakeRegistry(generator), log_budget_bytes=16_000)
    b = await start_node(redis_server.url, "n_b", FakeRegistry(generator))
    try:
        budget = a.sessions.log_budget
        assert budget is not None
        opened = []
        for n in range(3):
            box = outbox()
            runtime = (await a.sessions.connect(box, key_id="k", welcome=welcome)).runtime
            runtime.handle(Generate(type="generate", id=f"g{n}", prompt="hi"))
            opened.append((runtime, box, await collect(box, terminal(f"g{n}"))))
        detached, box0, events0 = opened[0]
        detached.detach(box0)
        await asyncio.sleep(0.05)  # the home hears the transport left
        for n, (runtime, box, _) in enumerate(opened[1:], 1):
            runtime.handle(Generate(type="generate", id=f"more{n}", prompt="hi"))
            await collect(box, terminal(f"more{n}"))
        assert budget.reclaims > 0 and budget.held <= budget.max_bytes
        # The detached session's copy went whole, the attached ones' only from their oldest.
        assert detached.event_log is not None and len(detached.event_log) == 0
        for runtime, _, _ in opened[1:]:
            assert runtime.event_log is not None and 0 < len(runtime.event_log)
            assert runtime.event_log.after(runtime.last_seq - len(runtime.event_log)) is not None
        # Its resume, on its home and on the other node, is exact (read from Redis).
        for node in (a, b):
            box = outbox()
            again = await node.sessions.connect(
                box, key_id="k", welcome=welcome, resume=detached.id, last_seq=0
            )
            assert again.resumed
            replayed = await collect(box, lambda ev: len(ev) >= len(events0))
            assert replayed[1:] == events0[1:]
            again.runtime.detach(box)
    finally:
        await a.close()
        await b.close()


async def test_a_new_home_goes_on_with_the_turns_whose_done_the_log_holds(redis_server: RedisServer) -> None:
    _fresh(redis_server)
    generator = ScriptedGenerator(pieces=["an ", "answer"])
    a = await start_node(redis_server.url, "n_a", FakeRegistry(generator))
    b = await start_node(redis_server.url, "n_b", FakeRegistry(generator))
    try:
        box = outbox()
        runtime = (await a.sessions.connect(box, key_id="k", welcome=welcome)).runtime
        runtime.handle(Generate(type="generate", id="h1", prompt="one", history=True))
        first = await collect(box, terminal("h1"))
        # a writes the second turn's conversation, then dies before its log write gets through.
        never = asyncio.Event()

        async def stuck(commands: object) -> list[object]:
            await never.wait()
            return []

        a.store.round_trip = stuck  # type: ignore[method-assign]
        runtime.handle(Generate(type="generate", id="h2", prompt="two", history=True))
        key = history_key(runtime.id)
        for _ in range(100):
            stored = await b.store.client.get(key)
            if stored is not None and len(orjson.loads(stored)) == 4:
                break
            await asyncio.sleep(0.02)
        assert [turn["content"] for _, turn in orjson.loads(stored or b"[]")] == [
            "one",
            "an answer",
            "two",
            "an answer",
        ]
        await kill(a)
        on_b = outbox()
        view = await b.sessions.connect(
            on_b, key_id="k", welcome=welcome, resume=runtime.id, last_seq=first[-1]["seq"]
        )
        assert view.resumed
        view.runtime.handle(Generate(type="generate", id="h3", prompt="three", history=True))
        await collect(on_b, terminal("h3"), within=15.0)
        asked = generator.records[-1].request.messages
        assert asked is not None
        assert [(turn.role, turn.content) for turn in asked] == [
            ("user", "one"),
            ("assistant", "an answer"),
            ("user", "three"),
        ]
    finally:
        await a.close()
        await b.close()


def test_a_stored_conversation_keeps_the_turns_whose_done_is_logged_or_older_than_the_window() -> None:
    def turn(text: str) -> list[object]:
        return [{"role": "user", "content": text}, {"role": "assistant", "content": "ok"}]

    stored = [[3, m] for m in turn("old")] + [[9, m] for m in turn("kept")] + [[12, m] for m in turn("lost")]
    done = Done(
        id="r",
        seq=9,
        finish_reason="stop",
        usage=Usage(prompt_tokens=1, completion_tokens=1),
        timings=Timings(queue_ms=0.0, ttft_ms=None, total_ms=1.0),
        model="m",
    )
    # The window holds seqs 8..12; 12 is the error a survivor logged in place of the lost done.
    past = [
        Delta(id="r", seq=8, text="ok"),
        done,
        Delta(id="x", seq=10, text="a"),
        Delta(id="x", seq=11, text="b"),
    ]
    past.append(Error(id="r2", seq=12, code="internal", message="stopped", retryable=True))
    turns = load(orjson.dumps(stored), past, 12)
    assert [(seq, m.content) for seq, m in turns] == [(3, "old"), (3, "ok"), (9, "kept"), (9, "ok")]
    assert all(isinstance(m, ChatMessage) for _, m in turns)
    assert load(None, past, 12) == [] and load(b"not json", past, 12) == []


async def test_a_node_taken_for_dead_that_comes_back_listens_again_and_misses_nothing(
    redis_server: RedisServer,
) -> None:
    _fresh(redis_server)
    generator = ScriptedGenerator(pieces=PIECES, delay_s=0.002)
    a = await start_node(redis_server.url, "n_a", FakeRegistry(generator))
    b = await start_node(redis_server.url, "n_b", FakeRegistry(generator))
    try:
        session = (await a.sessions.connect(outbox(), key_id="k", welcome=welcome)).runtime
        box = outbox()
        view = (
            await b.sessions.connect(box, key_id="k", welcome=welcome, resume=session.id, last_seq=0)
        ).runtime
        subs = subs_key(session.id)
        assert await a.store.client.smembers(subs) == {b"n_b"}
        # b stalled past its lease: a survivor took it off every subs (as `recover_node` does).
        await homes.unlisten_node(a.store, "n_b")
        assert await a.store.client.smembers(subs) == set()
        session.handle(Generate(type="generate", id="g1", prompt="hi"))
        await asyncio.sleep(0.05)  # some of it is logged while nothing reaches b
        await b.sessions.sweep()  # b, back, finds out and listens again
        assert await a.store.client.smembers(subs) == {b"n_b"}
        events = await collect(box, terminal("g1"))
        assert [e["seq"] for e in events[1:]] == list(range(1, len(events)))
        assert "".join(e["text"] for e in events if e["type"] == "delta") == "".join(PIECES)
        assert view.last_seq == events[-1]["seq"]
    finally:
        await a.close()
        await b.close()
