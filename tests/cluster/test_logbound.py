"""A node's bound on what the logs of the sessions it homes hold in Redis, against a real
redis-server: past it, detached sessions' logs are trimmed first (the longest detached first),
then the largest attached ones, exactly, with each one's next write (no Redis call of its own);
a resume that needs a trimmed event is refused whole, on its home and on any other node, and the
sessions left whole resume exactly (`server.cluster.logbound`)."""

from __future__ import annotations

import asyncio

from protocol.messages import Delta, Generate
from server.cluster.eventlog import LogWriter, RedisEventLog, read_after
from server.cluster.logbound import RedisBound, release
from server.cluster.redis import RedisStore
from server.cluster.scripts import log_key, meta_key
from tests.cluster.inprocess import collect, outbox, start_node, terminal, welcome
from tests.server.fakes import FakeRegistry, ScriptedGenerator
from tests.support.redis_server import RedisServer

NODE = "n_a"


async def _homed(store: RedisStore, writer: LogWriter, session: str) -> RedisEventLog:
    await store.client.hset(meta_key(session), mapping={"key": "k", "epoch": "e1", "seq": 0, "home": NODE})
    return RedisEventLog(session, "e1", capacity=4096, writer=writer)


def _append(event_log: RedisEventLog, count: int) -> None:
    first = event_log.last_seq + 1
    for seq in range(first, first + count):
        event_log.append(Delta(id="r1", seq=seq, text=f"token {seq:04d} "))


async def _in_redis(store: RedisStore, session: str) -> tuple[list[int], int]:
    """The seqs a session's stream holds, and their JSON bytes."""
    entries = await store.client.xrange(log_key(session))
    return [int(entry_id.split(b"-")[0]) for entry_id, _ in entries], sum(len(f[b"m"]) for _, f in entries)


def _evalsha_calls(redis_server: RedisServer) -> int:
    info = redis_server.command("INFO", "commandstats")
    assert isinstance(info, bytes)
    line = next((ln for ln in info.decode().splitlines() if ln.startswith("cmdstat_evalsha:")), "calls=0,")
    return int(line.split("calls=")[1].split(",")[0])


async def test_past_the_bound_detached_logs_go_first_exactly_and_with_no_call_of_their_own(
    store: RedisStore, redis_server: RedisServer
) -> None:
    writer = LogWriter(store, NODE, ttl_ms=60_000)
    older, newer, live = [await _homed(store, writer, s) for s in ("s_older", "s_newer", "s_live")]
    since = {id(older): 10.0, id(newer): 20.0, id(live): None}  # detached at 10 s, at 20 s; attached
    logs = [older, newer, live]
    bound = RedisBound(7_000, lambda: [(since[id(log)], log) for log in logs])
    for event_log in logs:
        bound.join(event_log)
        _append(event_log, 40)  # about 2,200 bytes each: 6,700 together
        await writer.flush()
    _append(live, 10)  # past the bound: to seven eighths of it, the longest detached first
    await writer.flush()
    await writer.flush()  # the trimmed logs' next write
    older_seqs, older_bytes = await _in_redis(store, "s_older")
    newer_seqs, newer_bytes = await _in_redis(store, "s_newer")
    live_seqs, live_bytes = await _in_redis(store, "s_live")
    assert live_seqs == list(range(1, 51)) and newer_seqs == list(range(1, 41))
    assert older_seqs and older_seqs == list(range(older_seqs[0], 41)) and older_seqs[0] > 1
    assert older_bytes + newer_bytes + live_bytes <= 7_000 * 7 // 8
    assert bound.budget.held == older_bytes + newer_bytes + live_bytes
    # A resume of the trimmed session from before what it holds is refused whole, here and anywhere.
    assert older.after(0) is None and await read_after(store, "s_older", 0) is None
    assert await read_after(store, "s_older", older_seqs[0] - 1) is not None
    # No Redis call of its own: one APPEND per write, as without a bound.
    assert _evalsha_calls(redis_server) == writer.round_trips


async def test_with_every_session_attached_the_largest_gives_up_its_oldest_events(store: RedisStore) -> None:
    writer = LogWriter(store, NODE, ttl_ms=60_000)
    small, large = await _homed(store, writer, "s_small"), await _homed(store, writer, "s_large")
    bound = RedisBound(4_000, lambda: [(None, small), (None, large)])
    bound.join(small)
    bound.join(large)
    _append(small, 20)
    _append(large, 60)  # together past the bound
    await writer.flush()
    await writer.flush()
    small_seqs, small_bytes = await _in_redis(store, "s_small")
    large_seqs, large_bytes = await _in_redis(store, "s_large")
    assert small_seqs == list(range(1, 21))
    assert large_seqs[0] > 1 and large_seqs[-1] == 60 and small_bytes + large_bytes <= 3_500
    # A session that ends (or moves) here no longer counts.
    release(large)
    assert bound.budget.held == small_bytes


async def test_a_session_trimmed_past_the_bound_resumes_as_a_new_one_on_any_node_the_others_exactly(
    redis_server: RedisServer,
) -> None:
    if not redis_server.running:
        redis_server.start()
    redis_server.command("FLUSHALL")
    generator = ScriptedGenerator(pieces=[f"{n:03d}" + "x" * 97 for n in range(40)], delay_s=0.002)
    # A request logs about 6 kB of JSON: the bound holds two and a half.
    a = await start_node(redis_server.url, "n_a", FakeRegistry(generator), log_budget_bytes=15_000)
    b = await start_node(redis_server.url, "n_b", FakeRegistry(generator))
    try:
        bound = a.sessions.redis_bound
        assert bound is not None
        box = outbox()
        detached = (await a.sessions.connect(box, key_id="k", welcome=welcome)).runtime
        detached.handle(Generate(type="generate", id="g0", prompt="hi"))
        await collect(box, terminal("g0"))
        detached.detach(box)
        await asyncio.sleep(0.05)  # the home hears the transport left
        live_box = outbox()
        live = (await a.sessions.connect(live_box, key_id="k", welcome=welcome)).runtime
        events = []
        for request_id in ("g1", "g2"):
            live.handle(Generate(type="generate", id=request_id, prompt="hi"))
            events += await collect(live_box, terminal(request_id))
        await a.sessions.writer.flush()
        await a.sessions.writer.flush()  # the trimmed session's own write
        seqs, _ = await _in_redis(a.store, detached.id)
        assert not seqs or seqs[0] > 1  # trimmed from its oldest
        assert (await _in_redis(a.store, live.id))[0][0] == 1  # untouched
        assert bound.budget.held <= bound.budget.max_bytes
        for node in (a, b):
            again = await node.sessions.connect(outbox(), key_id="k", welcome=welcome, resume=detached.id)
            assert not again.resumed  # never a partial replay
            resumed_box = outbox()
            exact = await node.sessions.connect(resumed_box, key_id="k", welcome=welcome, resume=live.id)
            assert exact.resumed
            replayed = await collect(resumed_box, lambda got: len(got) > len(events) - 1)
            assert replayed[1:] == events[1:]
            exact.runtime.detach(resumed_box)
    finally:
        await a.close()
        await b.close()
