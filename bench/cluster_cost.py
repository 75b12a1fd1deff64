"""Cluster mode's cost: server CPU per relayed token with Redis (one node, two nodes, and a
transport on another node than the session's home) against a single node without Redis.

One emulator (Ollama wire, paced streams) and one redis-server feed every target; the targets
run in the same process tree at the same time and are measured in interleaved rounds (single,
cluster, single, ...), so a busy machine slows all of them alike. Per round and target: N
concurrent WebSocket streams of T pieces each; CPU is each server process's user + system time
(psutil) over the round, divided by the tokens the clients received; Redis's own CPU per token is
reported beside it. Shapes:

- ``single``: one node, no Redis (today's in-memory path);
- ``cluster-local``: two nodes, every stream on the node that opened its session (its home);
- ``cluster-remote``: each stream's session opened on node A, its transport on node B (events
  relayed A → Redis → B): CPU of both nodes per token.

Then 200 resumes on node B of a session homed on node A (from 0, 60 tokens logged): time to the
welcome and to the last replayed event, p50 and p99.

Run: ``python -m bench.cluster_cost [--streams 40] [--tokens 300] [--rounds 3]`` prints JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import time
from collections.abc import Iterator
from typing import Any

import orjson
import psutil
from websockets.asyncio.client import ClientConnection, connect

from tests.support.ollama_emulator import start_emulator
from tests.support.redis_server import RedisServer, run_redis
from tests.support.server import ServerProcess, start_server

MODEL = "llama3.2:1b"


def _env(emu_url: str, redis_url: str = "", node: str = "") -> dict[str, str]:
    env = {
        "SLUICE_OLLAMA_URLS": emu_url,
        "SLUICE_LOAD_LOCAL_GENERATION": "false",
        "SLUICE_DEFAULT_MODEL": MODEL,
        "SLUICE_LOG_LEVEL": "warning",
    }
    if redis_url:
        env |= {"SLUICE_REDIS_URL": redis_url, "SLUICE_NODE_ID": node}
    return env


def _cpu(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


async def _recv(ws: ClientConnection) -> dict[str, Any]:
    event: dict[str, Any] = orjson.loads(await asyncio.wait_for(ws.recv(), 60))
    return event


async def _stream(open_url: str, read_url: str, n: int) -> tuple[int, float]:
    """One generation: session opened at ``open_url``, read at ``read_url``; the tokens received
    and the milliseconds from sending the request to its first delta."""
    ws = await connect(open_url, subprotocols=["sluice.v1"])  # type: ignore[list-item]
    await ws.send(orjson.dumps({"type": "hello", "protocol": 1}).decode())
    session = (await _recv(ws))["session"]
    request = {"type": "generate", "id": f"g{n}", "model": MODEL, "prompt": f"stream {n}"}
    sent = time.perf_counter()
    await ws.send(orjson.dumps(request).decode())
    first = 0.0
    if read_url != open_url:
        await ws.close()
        ws = await connect(read_url, subprotocols=["sluice.v1"])  # type: ignore[list-item]
        await ws.send(
            orjson.dumps({"type": "hello", "protocol": 1, "session": session, "last_seq": 0}).decode()
        )
        assert (await _recv(ws))["resumed"] is True
    while True:
        event = await _recv(ws)
        if not first and event["type"] == "delta":
            first = (time.perf_counter() - sent) * 1000
        if event["type"] == "done":
            await ws.close()
            tokens: int = event["usage"]["completion_tokens"]
            return tokens, first


async def _round(pairs: list[tuple[str, str]]) -> tuple[int, list[float]]:
    """Every pair's stream at once: the tokens received, and each stream's first-delta time."""
    done = await asyncio.gather(*(_stream(o, r, n) for n, (o, r) in enumerate(pairs)))
    return sum(tokens for tokens, _ in done), sorted(first for _, first in done)


async def _resumes(a: ServerProcess, b: ServerProcess, count: int) -> dict[str, float]:
    """Sessions opened on ``a`` with a finished 60-token answer, each resumed from 0 on ``b``:
    milliseconds from opening the socket to the welcome, and to the last replayed event."""
    ws = await connect(a.ws_url, subprotocols=["sluice.v1"])  # type: ignore[list-item]
    await ws.send(orjson.dumps({"type": "hello", "protocol": 1}).decode())
    session = (await _recv(ws))["session"]
    await ws.send(orjson.dumps({"type": "generate", "id": "r", "model": MODEL, "prompt": "resume"}).decode())
    last = await _recv(ws)
    while last["type"] != "done":
        last = await _recv(ws)
    await ws.close()
    to_welcome: list[float] = []
    to_replayed: list[float] = []
    for _ in range(count):
        started = time.perf_counter()
        ws = await connect(b.ws_url, subprotocols=["sluice.v1"])  # type: ignore[list-item]
        hello = {"type": "hello", "protocol": 1, "session": session, "last_seq": 0}
        await ws.send(orjson.dumps(hello).decode())
        welcome = await _recv(ws)
        assert welcome["resumed"] is True
        to_welcome.append((time.perf_counter() - started) * 1000)
        while (await _recv(ws))["seq"] != last["seq"]:
            pass
        to_replayed.append((time.perf_counter() - started) * 1000)
        await ws.close()
    to_welcome.sort()
    to_replayed.sort()
    return {
        "resumes": count,
        "events_replayed": last["seq"],
        "welcome_p50_ms": to_welcome[len(to_welcome) // 2],
        "welcome_p99_ms": to_welcome[int(len(to_welcome) * 0.99) - 1],
        "replayed_p50_ms": to_replayed[len(to_replayed) // 2],
        "replayed_p99_ms": to_replayed[int(len(to_replayed) * 0.99) - 1],
    }


def _calls(redis: RedisServer | None) -> dict[str, int]:
    """Redis's command counts so far (INFO commandstats)."""
    if redis is None:
        return {}
    info = redis.command("INFO", "commandstats")
    assert isinstance(info, bytes)
    calls: dict[str, int] = {}
    for line in info.decode().splitlines():
        if line.startswith("cmdstat_"):
            name, _, rest = line[len("cmdstat_") :].partition(":")
            calls[name] = int(rest.split("calls=")[1].split(",")[0])
    return calls


def _measure(pids: list[int], redis: RedisServer | None, pairs: list[tuple[str, str]]) -> dict[str, float]:
    redis_pid = redis.process.pid if redis is not None and redis.process is not None else None
    before = [_cpu(pid) for pid in pids]
    redis_before = _cpu(redis_pid) if redis_pid else 0.0
    calls_before = _calls(redis)
    tokens, firsts = asyncio.run(_round(pairs))
    node_cpu = sum(_cpu(pid) - b for pid, b in zip(pids, before, strict=True))
    redis_cpu = (_cpu(redis_pid) - redis_before) if redis_pid else 0.0
    calls = _calls(redis)
    return {
        "tokens": tokens,
        "node_us_per_token": node_cpu / tokens * 1e6,
        "redis_us_per_token": redis_cpu / tokens * 1e6,
        "appends_per_token": (calls.get("evalsha", 0) - calls_before.get("evalsha", 0)) / tokens,
        "first_delta_p50_ms": firsts[len(firsts) // 2],
        "first_delta_p99_ms": firsts[-1] if len(firsts) < 100 else firsts[int(len(firsts) * 0.99) - 1],
    }


@contextlib.contextmanager
def _servers(
    emu_url: str, redis: RedisServer
) -> Iterator[tuple[ServerProcess, ServerProcess, ServerProcess]]:
    started: list[ServerProcess] = []
    try:
        for env in (_env(emu_url), _env(emu_url, redis.url, "a"), _env(emu_url, redis.url, "b")):
            started.append(start_server(env))
        yield started[0], started[1], started[2]
    finally:
        for server in started:
            server.stop()


def run(streams: int, tokens: int, rounds: int) -> dict[str, Any]:
    with (
        run_redis() as redis,
        start_emulator(token_rate=200.0, tokens=tokens, lines_per_write=1, split_lines=False) as emu,
    ):
        assert redis.process is not None
        with _servers(emu.url, redis) as (single, a, b):
            shapes = {
                "single": ([single.process.pid], None, [(single.ws_url, single.ws_url)] * streams),
                "cluster-local": (
                    [a.process.pid, b.process.pid],
                    redis,
                    [(node.ws_url, node.ws_url) for node in (a, b)] * (streams // 2),
                ),
                "cluster-remote": (
                    [a.process.pid, b.process.pid],
                    redis,
                    [(a.ws_url, b.ws_url)] * streams,
                ),
            }
            results: dict[str, list[dict[str, float]]] = {name: [] for name in shapes}
            for _ in range(rounds):
                for name, (pids, store, pairs) in shapes.items():
                    results[name].append(_measure(pids, store, pairs))
            resume = asyncio.run(_resumes(a, b, 200))
    summary: dict[str, Any] = {"streams": streams, "tokens_per_stream": tokens, "rounds": rounds}
    for name, rows in results.items():
        summary[name] = {
            "node_us_per_token": statistics.median(r["node_us_per_token"] for r in rows),
            "redis_us_per_token": statistics.median(r["redis_us_per_token"] for r in rows),
            "appends_per_token": statistics.median(r["appends_per_token"] for r in rows),
            "first_delta_p50_ms": statistics.median(r["first_delta_p50_ms"] for r in rows),
            "first_delta_p99_ms": statistics.median(r["first_delta_p99_ms"] for r in rows),
            "tokens_per_round": rows[0]["tokens"],
        }
    base = summary["single"]["node_us_per_token"]
    for name in ("cluster-local", "cluster-remote"):
        summary[name]["ratio_to_single"] = summary[name]["node_us_per_token"] / base
    summary["resume_on_other_node"] = resume
    summary["cpu"] = _cpu_model()
    return summary


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=40)
    parser.add_argument("--tokens", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    sys.stdout.write(
        orjson.dumps(run(args.streams, args.tokens, args.rounds), option=orjson.OPT_INDENT_2).decode() + "\n"
    )


if __name__ == "__main__":
    main()
