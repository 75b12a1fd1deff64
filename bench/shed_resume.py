"""What a shed log costs a resume on its home in cluster mode: memory against Redis.

Two sessions homed on one in-process cluster node (a real redis-server, the fake backends) log
the same reply; the node's `LogBudget` then sheds the in-memory copy of one of them, as it does
past ``SLUICE_MAX_LOG_BYTES``. Each round resumes both from seq 0, in alternating order: one
replays from memory, the other reads its events from Redis (`read_after`). Reported per kind:
wall time from the resume until the whole replay is queued (p50, p99) and process CPU per
resume (this process runs the node and the reader). Run: ``python -m bench.shed_resume``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

from protocol.messages import Generate
from tests.cluster.inprocess import InProcessNode, collect, outbox, start_node, terminal, welcome
from tests.server.fakes import FakeRegistry, ScriptedGenerator
from tests.support.redis_server import run_redis


async def _logged(node: InProcessNode, pieces: int) -> tuple[str, int]:
    box = outbox()
    runtime = (await node.sessions.connect(box, key_id="k", welcome=welcome)).runtime
    runtime.handle(Generate(type="generate", id="g", prompt=f"{pieces} pieces"))
    events = await collect(box, terminal("g"), within=60)
    runtime.detach(box)
    return runtime.id, len(events) - 1


async def _resume(node: InProcessNode, session: str, events: int) -> tuple[float, float]:
    box = outbox()
    cpu, wall = time.process_time(), time.perf_counter()
    connected = await node.sessions.connect(box, key_id="k", welcome=welcome, resume=session, last_seq=0)
    frames = await collect(box, lambda got: len(got) > events)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert connected.resumed and len(frames) == events + 1
    connected.runtime.detach(box)
    return wall, cpu


async def run(rounds: int, pieces: int) -> dict[str, object]:
    with run_redis() as redis:
        generator = ScriptedGenerator(pieces=[f"w{n} " for n in range(pieces)], delay_s=0.003)
        node = await start_node(redis.url, "n_bench", FakeRegistry(generator), log_budget_bytes=1 << 30)
        try:
            kept, events = await _logged(node, pieces)
            shed, shed_events = await _logged(node, pieces)
            assert events == shed_events
            for session in node.sessions:
                if session.id == shed and session.event_log is not None:
                    session.event_log.memory.shed(1 << 40)  # what the budget does past its bound
            walls: dict[str, list[float]] = {"memory": [], "redis": []}
            cpus: dict[str, float] = {"memory": 0.0, "redis": 0.0}
            for n in range(rounds):
                order = [("memory", kept), ("redis", shed)]
                for kind, session in order if n % 2 else order[::-1]:
                    wall, cpu = await _resume(node, session, events)
                    walls[kind].append(wall)
                    cpus[kind] += cpu
                    await asyncio.sleep(0.002)
        finally:
            await node.close()
    result: dict[str, object] = {"rounds": rounds, "events": events}
    for kind, times in walls.items():
        times.sort()
        result[kind] = {
            "p50_ms": round(statistics.median(times) * 1e3, 2),
            "p99_ms": round(times[int(len(times) * 0.99)] * 1e3, 2),
            "cpu_ms_per_resume": round(cpus[kind] / len(times) * 1e3, 2),
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--pieces", type=int, default=300)
    parser.add_argument("--out", type=Path, default=None, help="also write the result here (JSON)")
    args = parser.parse_args()
    result = asyncio.run(run(args.rounds, args.pieces))
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
