"""Cluster mode in-process where one node alone used to differ: two nodes, one real redis-server,
fake backends. The home's log memory within the node's budget (detached sessions' copies shed
first, their resumes read from Redis, exactly)."""

from __future__ import annotations

import asyncio

from protocol.messages import Generate
from tests.cluster.inprocess import collect, outbox, start_node, terminal, welcome
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
