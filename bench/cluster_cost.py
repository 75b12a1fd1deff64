"""Cluster mode's cost: server CPU per relayed token with Redis (one node, two nodes, and a
transport on another node than the session's home) against a single node without Redis.

One emulator (Ollama wire, paced streams) and one redis-server feed every target; the targets
run at the same time and are measured first each alone (its rounds back to back), then in
interleaved rounds (single, cluster, single, ...), so a busy machine slows all of them alike.
Per round and target: N concurrent WebSocket streams of T pieces each; CPU is each server
process's user + system time (psutil) over the round, divided by the tokens the clients
received; beside it Redis's own CPU per token, the APPEND calls Redis ran per token (one per
round trip of a home's log writer), the reads Redis made from its clients' sockets per token
(about one per round trip), the time from a request to its first delta, and each delta's lag in
the second half of its stream: when it came, less the emulator's pace from that half's
best-placed delta (what batching and the relay hold tokens back, beside the emulator's own
jitter), p50 and p99. Shapes:

- ``single``: one node, no Redis (today's in-memory path);
- ``single-half``: the same node with half the streams, what each node of the 2-node shapes
  carries (a node's CPU per token is not flat in its load: a busier event loop serves more
  sockets per wake-up);
- ``cluster-local``: two nodes, every stream on the node that opened its session (its home);
- ``cluster-remote``: each stream's session opened on node A, its transport on node B (events
  relayed A → Redis → B; the first delta's time includes the reconnect): CPU of both nodes;
- with ``--baseline DIR`` (another checkout, e.g. a ``git worktree`` of an older commit), also
  ``cluster-local-base`` and ``cluster-remote-base``: the same shapes on two nodes running DIR's
  code (same emulator and Redis), in the same interleaved rounds.

Then resumes on node B of a session homed on node A (from 0, T tokens logged): time to the
welcome and to the last replayed event, p50 and p99.

Run: ``python -m bench.cluster_cost [--streams 40] [--tokens 300] [--rounds 5] [--baseline DIR]``
prints JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson
import psutil
from websockets.asyncio.client import ClientConnection, connect

from tests.support.ollama_emulator import start_emulator
from tests.support.redis_server import RedisServer, run_redis
from tests.support.server import ServerProcess, start_server

GENERATOR = "1 Python asyncio process: websockets clients, one session per stream"

MODEL = "llama3.2:1b"
TOKEN_RATE = 200.0
_PIECE_MS = 1000 / TOKEN_RATE


def _env(emu_url: str, redis_url: str = "", node: str = "", tree: str = "") -> dict[str, str]:
    env = {
        "SLUICE_OLLAMA_URLS": emu_url,
        "SLUICE_LOAD_LOCAL_GENERATION": "false",
        "SLUICE_DEFAULT_MODEL": MODEL,
        "SLUICE_LOG_LEVEL": "warning",
    }
    if redis_url:
        env |= {"SLUICE_REDIS_URL": redis_url, "SLUICE_NODE_ID": node}
    if tree:  # that checkout's code, not this one's (the server runs with this one as its cwd)
        env |= {"PYTHONSAFEPATH": "1", "PYTHONPATH": f"{tree}:{tree}/clients/python"}
    return env


def _cpu(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


async def _recv(ws: ClientConnection) -> dict[str, Any]:
    event: dict[str, Any] = orjson.loads(await asyncio.wait_for(ws.recv(), 60))
    return event


async def _stream(open_url: str, read_url: str, n: int, lag: bool) -> tuple[int, float, list[float]]:
    """One generation: session opened at ``open_url``, read at ``read_url``; the tokens received,
    the milliseconds from sending the request to its first delta, and (with ``lag``) each delta's
    lag (below)."""
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
    # Per delta: when it came, less the time the emulator's pacing puts its last token after
    # the first (pieces are words, every one after the first starting with a space); kept for
    # the second half of the stream only, well past a reconnect and the replay after it.
    lags: list[tuple[int, float]] = []
    pieces = 0
    while True:
        event = await _recv(ws)
        if event["type"] == "delta" and (lag or not first):
            now = time.perf_counter()
            if not first:
                first = (now - sent) * 1000
            pieces += event["text"].count(" ") + (0 if pieces else 1)
            lags.append((pieces, (now - sent) * 1000 - (pieces - 1) * _PIECE_MS))
        if event["type"] == "done":
            await ws.close()
            tokens: int = event["usage"]["completion_tokens"]
            steady = [lag for piece, lag in lags if piece > tokens // 2]
            best = min(steady, default=0.0)
            return tokens, first, [lag - best for lag in steady]


async def stream_round(
    pairs: list[tuple[str, str]], *, lag: bool = False
) -> tuple[int, list[float], list[float]]:
    """Every pair's stream at once: the tokens received, each stream's first-delta time, and
    (with ``lag``: paced streams) every delta's lag behind the pace of its stream's best one."""
    done = await asyncio.gather(*(_stream(o, r, n, lag) for n, (o, r) in enumerate(pairs)))
    lags = sorted(lag for _, _, stream in done for lag in stream)
    return sum(tokens for tokens, _, _ in done), sorted(first for _, first, _ in done), lags


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
    stats = redis.command("INFO", "stats")
    assert isinstance(stats, bytes)
    for line in stats.decode().splitlines():
        if line.startswith("total_reads_processed:"):
            calls["reads"] = int(line.split(":")[1])
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
    tokens, firsts, lags = asyncio.run(stream_round(pairs, lag=True))
    node_cpu = sum(_cpu(pid) - b for pid, b in zip(pids, before, strict=True))
    redis_cpu = (_cpu(redis_pid) - redis_before) if redis_pid else 0.0
    calls = _calls(redis)
    return {
        "tokens": tokens,
        "node_us_per_token": node_cpu / tokens * 1e6,
        "redis_us_per_token": redis_cpu / tokens * 1e6,
        "appends_per_token": (calls.get("evalsha", 0) - calls_before.get("evalsha", 0)) / tokens,
        # Reads Redis made from its clients' sockets: about one per round trip any node made.
        "redis_reads_per_token": (calls.get("reads", 0) - calls_before.get("reads", 0)) / tokens,
        "first_delta_p50_ms": firsts[len(firsts) // 2],
        "first_delta_p99_ms": firsts[-1] if len(firsts) < 100 else firsts[int(len(firsts) * 0.99) - 1],
        # How long a delta came after the pace of its stream's best-placed one: what batching
        # (merging, the write interval, the relay) holds tokens back, beside the emulator's jitter.
        "token_lag_p50_ms": lags[len(lags) // 2] if lags else 0.0,
        "token_lag_p99_ms": lags[int(len(lags) * 0.99)] if lags else 0.0,
    }


@contextlib.contextmanager
def _servers(emu_url: str, redis: RedisServer, baseline: str) -> Iterator[list[ServerProcess]]:
    """The single node, nodes a and b, then (with a ``baseline`` tree) its nodes a0 and b0."""
    envs = [_env(emu_url), _env(emu_url, redis.url, "a"), _env(emu_url, redis.url, "b")]
    if baseline:
        envs += [_env(emu_url, redis.url, "a0", baseline), _env(emu_url, redis.url, "b0", baseline)]
    started: list[ServerProcess] = []
    try:
        for env in envs:
            started.append(start_server(env))
        yield started
    finally:
        for server in started:
            server.stop()


@dataclass(frozen=True)
class ClusterCostConfig:
    streams: int = 40
    tokens: int = 300
    rounds: int = 5
    resumes: int = 200
    baseline: str = ""

    @classmethod
    def quick(cls) -> ClusterCostConfig:
        return cls(streams=10, tokens=60, rounds=1, resumes=20)


def _summary(rows: list[dict[str, float]]) -> dict[str, Any]:
    fields = [field for field in rows[0] if field != "tokens"]
    summary: dict[str, Any] = {field: statistics.median(row[field] for row in rows) for field in fields}
    summary["node_us_per_token_rounds"] = [round(row["node_us_per_token"], 1) for row in rows]
    summary["tokens_per_round"] = rows[0]["tokens"]
    return summary


def run(config: ClusterCostConfig) -> dict[str, Any]:
    """Each shape measured alone (its rounds back to back), then all of them in interleaved
    rounds; medians per phase, with the ratio of each cluster shape to the single node."""
    streams = config.streams
    load_before = os.getloadavg()
    with (
        run_redis() as redis,
        start_emulator(
            token_rate=TOKEN_RATE, tokens=config.tokens, lines_per_write=1, split_lines=False
        ) as emu,
    ):
        with _servers(emu.url, redis, config.baseline) as servers:
            single, a, b = servers[:3]
            shapes: dict[str, tuple[list[int], RedisServer | None, list[tuple[str, str]]]] = {
                "single": ([single.process.pid], None, [(single.ws_url, single.ws_url)] * streams),
                "single-half": (
                    [single.process.pid],
                    None,
                    [(single.ws_url, single.ws_url)] * (streams // 2),
                ),
            }
            trees = [("", a, b)] + ([("-base", servers[3], servers[4])] if config.baseline else [])
            for suffix, x, y in trees:
                pids = [x.process.pid, y.process.pid]
                local = [(node.ws_url, node.ws_url) for node in (x, y)] * (streams // 2)
                shapes[f"cluster-local{suffix}"] = (pids, redis, local)
                shapes[f"cluster-remote{suffix}"] = (pids, redis, [(x.ws_url, y.ws_url)] * streams)
            for pids, store, pairs in shapes.values():  # warm every server and path once
                _measure(pids, store, pairs[:4])
            phases: dict[str, dict[str, list[dict[str, float]]]] = {
                phase: {name: [] for name in shapes} for phase in ("alone", "interleaved")
            }
            for name, (pids, store, pairs) in shapes.items():
                for _ in range(config.rounds):
                    phases["alone"][name].append(_measure(pids, store, pairs))
            for _ in range(config.rounds):
                for name, (pids, store, pairs) in shapes.items():
                    phases["interleaved"][name].append(_measure(pids, store, pairs))
            resume = asyncio.run(_resumes(a, b, config.resumes))
    summary: dict[str, Any] = {
        "generator": GENERATOR,
        "streams": streams,
        "tokens_per_stream": config.tokens,
        "rounds": config.rounds,
        "cpu": cpu_model(),
        "baseline": config.baseline,
        "baseline_commit": _commit(config.baseline) if config.baseline else "",
        "commit": _commit("."),
        # 1, 5 and 15 minute load averages before and after the run (the machine may be shared).
        "load_average": [[round(x, 2) for x in load] for load in (load_before, os.getloadavg())],
    }
    for phase, results in phases.items():
        section = summary[phase] = {name: _summary(rows) for name, rows in results.items()}
        base = section["single"]["node_us_per_token"]
        for name in section.keys() - {"single"}:
            section[name]["ratio_to_single"] = section[name]["node_us_per_token"] / base
    summary["resume_on_other_node"] = resume
    return summary


def _commit(tree: str) -> str:
    """The short commit id checked out in ``tree`` (with ``+`` when it has changes), or ""."""
    try:
        head = subprocess.run(
            ["git", "-C", tree, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "-C", tree, "status", "--porcelain", "-uno"], capture_output=True, text=True
        )
    except OSError:
        return ""
    return head.stdout.strip() + ("+" if dirty.stdout.strip() else "")


def cpu_model() -> str:
    """The ``model name`` of /proc/cpuinfo."""
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = ClusterCostConfig()
    parser.add_argument("--streams", type=int, default=defaults.streams)
    parser.add_argument("--tokens", type=int, default=defaults.tokens)
    parser.add_argument("--rounds", type=int, default=defaults.rounds)
    parser.add_argument("--baseline", default="", help="another checkout whose nodes run beside")
    args = parser.parse_args(argv)
    config = ClusterCostConfig(
        streams=args.streams, tokens=args.tokens, rounds=args.rounds, baseline=args.baseline
    )
    sys.stdout.write(orjson.dumps(run(config), option=orjson.OPT_INDENT_2).decode() + "\n")


if __name__ == "__main__":
    main()
