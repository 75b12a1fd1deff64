"""`sluice serve --workers 2` against one worker at saturation: tokens per second delivered, server
CPU per token, and Redis's CPU per token, on whatever cores this machine has.

One emulator (Ollama wire, effectively unpaced: far more tokens per second than one process
relays) and one redis-server feed three servers that run at the same time and are measured in
interleaved rounds: one worker without Redis (today's in-memory path), one worker in cluster mode,
and two workers in cluster mode (one port, sessions shared through Redis). Per round and server:
N concurrent WebSocket streams of T tokens each, all started at once; throughput is the tokens
the clients received over the round's wall time; CPU is the server's process tree (the parent
and its workers) over the round. The load generator and the emulator run in this process, and
Redis beside it, on the same cores: ``busy_cores`` (server CPU seconds per wall second) tells
how much of the machine the server got, so a ratio below 2x reads against it.

Run: ``python -m bench.workers [--streams 120] [--tokens 400] [--rounds 3]`` prints JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import psutil

from bench.cluster_cost import GENERATOR, MODEL, cpu_model, stream_round
from tests.support.ollama_emulator import start_emulator
from tests.support.redis_server import run_redis
from tests.support.server import ServerProcess, start_server

__all__ = ["WorkersConfig", "run"]

SHAPES = ("1 worker, no Redis", "1 worker, Redis", "2 workers, Redis")


@dataclass(frozen=True)
class WorkersConfig:
    streams: int = 120
    tokens: int = 400
    rounds: int = 3
    token_rate: float = 5000.0  # per stream: unpaced next to what a worker relays

    @classmethod
    def quick(cls) -> WorkersConfig:
        return cls(streams=20, tokens=100, rounds=1)


def _tree_cpu(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its live children."""
    root = psutil.Process(pid)
    total = 0.0
    for proc in (root, *root.children(recursive=True)):
        with contextlib.suppress(psutil.NoSuchProcess):
            times = proc.cpu_times()
            total += times.user + times.system
    return total


def _all_ready(url: str, *, timeout: float = 60.0) -> None:
    """Wait for 20 ``/ready`` answers in a row (one worker being ready says nothing of another)."""
    deadline, in_a_row = time.monotonic() + timeout, 0
    with httpx.Client(timeout=2.0) as client:
        while in_a_row < 20:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} not ready on every worker within {timeout:.0f} s")
            ok = client.get(f"{url}/ready", headers={"Connection": "close"}).status_code == 200
            in_a_row = in_a_row + 1 if ok else 0
            time.sleep(0.05)


@contextlib.contextmanager
def _servers(emu_url: str, redis_url: str) -> Iterator[dict[str, ServerProcess]]:
    base = {
        "SLUICE_OLLAMA_URLS": emu_url,
        "SLUICE_LOAD_LOCAL_GENERATION": "false",
        "SLUICE_DEFAULT_MODEL": MODEL,
        "SLUICE_LOG_LEVEL": "warning",
    }
    envs = {
        SHAPES[0]: base,
        SHAPES[1]: base | {"SLUICE_REDIS_URL": redis_url},
        SHAPES[2]: base | {"SLUICE_REDIS_URL": redis_url, "SLUICE_WORKERS": "2"},
    }
    started: dict[str, ServerProcess] = {}
    try:
        for name, env in envs.items():
            started[name] = start_server(env)
            _all_ready(started[name].url)
        yield started
    finally:
        for server in started.values():
            server.stop()


def _measure(server: ServerProcess, redis_pid: int, streams: int) -> dict[str, float]:
    cpu_before, redis_before = _tree_cpu(server.process.pid), _tree_cpu(redis_pid)
    started = time.perf_counter()
    tokens, _, _ = asyncio.run(stream_round([(server.ws_url, server.ws_url)] * streams))
    wall = time.perf_counter() - started
    cpu = _tree_cpu(server.process.pid) - cpu_before
    return {
        "tokens": tokens,
        "tokens_per_s": tokens / wall,
        "server_us_per_token": cpu / tokens * 1e6,
        "redis_us_per_token": (_tree_cpu(redis_pid) - redis_before) / tokens * 1e6,
        "busy_cores": cpu / wall,
    }


def run(config: WorkersConfig) -> dict[str, Any]:
    with (
        run_redis() as redis,
        start_emulator(token_rate=config.token_rate, tokens=config.tokens, lines_per_write=1) as emu,
        _servers(emu.url, redis.url) as servers,
    ):
        assert redis.process is not None
        for server in servers.values():  # warm: every worker has served, every import is done
            asyncio.run(stream_round([(server.ws_url, server.ws_url)] * 8))
        rows: dict[str, list[dict[str, float]]] = {name: [] for name in servers}
        for _ in range(config.rounds):
            for name, server in servers.items():
                rows[name].append(_measure(server, redis.process.pid, config.streams))
    summary: dict[str, Any] = {
        "generator": GENERATOR,
        "streams": config.streams,
        "tokens_per_stream": config.tokens,
        "rounds": config.rounds,
        "cpu": cpu_model(),
        "cores": psutil.cpu_count(),
    }
    for name, measured in rows.items():
        summary[name] = {
            field: statistics.median(row[field] for row in measured)
            for field in measured[0]
            if field != "tokens"
        }
        summary[name]["tokens_per_s_rounds"] = [round(row["tokens_per_s"]) for row in measured]
    one = summary[SHAPES[1]]["tokens_per_s"]
    summary["two_vs_one_worker"] = summary[SHAPES[2]]["tokens_per_s"] / one
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = WorkersConfig()
    parser.add_argument("--streams", type=int, default=defaults.streams)
    parser.add_argument("--tokens", type=int, default=defaults.tokens)
    parser.add_argument("--rounds", type=int, default=defaults.rounds)
    args = parser.parse_args(argv)
    result = run(WorkersConfig(streams=args.streams, tokens=args.tokens, rounds=args.rounds))
    sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")


if __name__ == "__main__":
    main()
