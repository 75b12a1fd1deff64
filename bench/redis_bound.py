"""What the node's bound on Redis log memory costs (`server.cluster.logbound`), and what it holds.

One process is the home of ``--sessions`` sessions, their `RedisEventLog`s written by one
`LogWriter` to a real redis-server; each write carries one new one-token delta per session (as
under load: about one event per session per write). Two shapes, in interleaved rounds, each on a
fresh Redis database: no bound, and a bound of ``--bound-fraction`` of what the windows would
hold (so the bound sheds on most writes). Reported per shape: this process's CPU per event, the
commands Redis ran per write (``INFO commandstats``: scripts' own commands included), Redis's
CPU per event, and what the logs hold in Redis at the end (their entries' JSON bytes and
``used_memory``). A reclaim trims sessions that may have nothing else to write, so the writer's
next round trip carries their trims (``writes`` counts every `APPEND` call). Run:
``python -m bench.redis_bound``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

from protocol.codec import encode
from protocol.messages import Delta
from server.cluster.eventlog import LogWriter, RedisEventLog
from server.cluster.logbound import RedisBound
from server.cluster.redis import RedisStore
from server.cluster.scripts import log_key, meta_key
from tests.support.redis_server import RedisServer, run_redis

NODE = "n_bench"


def _info(redis: RedisServer, section: str) -> dict[str, str]:
    raw = redis.command("INFO", section)
    assert isinstance(raw, bytes)
    return dict(line.split(":", 1) for line in raw.decode().splitlines() if ":" in line)


def _calls(redis: RedisServer) -> int:
    stats = _info(redis, "commandstats")
    return sum(
        int(value.split("calls=")[1].split(",")[0])
        for key, value in stats.items()
        if key.startswith("cmdstat_")
    )


def _redis_cpu(redis: RedisServer) -> float:
    cpu = _info(redis, "cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


async def _shape(
    redis: RedisServer, sessions: int, writes: int, pad: str, bound_bytes: int
) -> dict[str, Any]:
    redis.command("FLUSHALL")
    store = RedisStore(redis.url)
    await store.start()
    try:
        writer = LogWriter(store, NODE, ttl_ms=600_000)
        logs = []
        for n in range(sessions):
            sid = f"s_{n:04d}"
            await store.client.hset(meta_key(sid), mapping={"key": "k", "epoch": "e", "seq": 0, "home": NODE})
            logs.append(RedisEventLog(sid, "e", capacity=4096, writer=writer))
        bound = RedisBound(bound_bytes, lambda: [(None, log) for log in logs]) if bound_bytes else None
        for event_log in logs:
            if bound is not None:
                bound.join(event_log)
        redis.command("CONFIG", "RESETSTAT")
        trips, cpu, redis_cpu = writer.round_trips, time.process_time(), _redis_cpu(redis)
        for seq in range(1, writes + 1):
            for event_log in logs:
                event_log.append_delta("r1", seq, f"{pad}{seq:05d} ")
            await writer.flush()
        cpu, redis_cpu = time.process_time() - cpu, _redis_cpu(redis) - redis_cpu
        trips = writer.round_trips - trips
        held = 0
        for event_log in logs:
            entries = await store.client.xrange(log_key(event_log.session_id))
            held += sum(len(fields[b"m"]) for _, fields in entries)
        events = sessions * writes
        return {
            "bound_bytes": bound_bytes,
            "cpu_us_per_event": cpu / events * 1e6,
            "redis_cpu_us_per_event": redis_cpu / events * 1e6,
            "redis_commands_per_write": _calls(redis) / trips,
            "writes": trips,
            "log_json_bytes_in_redis": held,
            "redis_used_memory": int(_info(redis, "memory")["used_memory"]),
        }
    finally:
        await store.close()


async def run(sessions: int, writes: int, rounds: int, fraction: float, text_bytes: int) -> dict[str, Any]:
    pad = "t" * max(0, text_bytes - 6)
    sample = len(encode(Delta(id="r1", seq=writes, text=f"{pad}{writes:05d} ")))
    bound = int(sessions * writes * sample * fraction)
    results: dict[str, list[dict[str, Any]]] = {"unbounded": [], "bounded": []}
    with run_redis(save="") as redis:
        for _ in range(rounds):
            results["unbounded"].append(await _shape(redis, sessions, writes, pad, 0))
            results["bounded"].append(await _shape(redis, sessions, writes, pad, bound))
    shape = {"sessions": sessions, "writes": writes, "rounds": rounds, "text_bytes": text_bytes}
    return {**shape, "bound_bytes": bound, "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sessions", type=int, default=100)
    parser.add_argument("--writes", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bound-fraction", type=float, default=0.5)
    parser.add_argument("--text-bytes", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("bench/results/redis_bound.json"))
    args = parser.parse_args()
    logging.getLogger("sluice").setLevel(logging.ERROR)  # each reclaim's warning, hundreds of times
    report = asyncio.run(run(args.sessions, args.writes, args.rounds, args.bound_fraction, args.text_bytes))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    for shape, rows in report["results"].items():
        for row in rows:
            print(shape, {k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()})


if __name__ == "__main__":
    main()
