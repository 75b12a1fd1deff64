"""Benchmark 2: token relay from (emulated) Ollama, 100 and 500 concurrent streams.

Targets: sluice over WebSocket (one session per stream, a `generate` naming an Ollama model),
sluice's own seed-compatible HTTP stream (`sluice-http`: the same `/api/v1/generate/stream` wire
as the seed relay), the seed-style relay, and the emulator read directly (no relay: the jitter
floor of emulator + client on this machine). The emulator paces every stream at `token_rate`
pieces/s on an absolute schedule (piece i at t0 + i/rate, one piece per write, no line splitting —
how a real Ollama flushes). Stream starts are spread evenly over `ramp_s` so their phases differ.

Figures per target and stream count:
- server CPU seconds per 1,000 tokens: the server process's own counters (psutil: utime + stime
  of the process tree) read at the instant every stream has started and when every stream ended;
- added inter-token delay: for each token after a stream's first, its client-side arrival gap
  minus the emulator's schedule gap (1/rate). The figure is p50/p99/max over the steady state —
  tokens arriving once every stream has started and before any has ended, so all N streams run
  at once; `all_added_gap_*` also counts the ramp, when new streams are still being admitted;
- tokens lost: tokens the emulator emitted (rate x streams, counted at the client from the text)
  that never arrived, and streams that ended in an error.
The load generator is several forked Python processes (`bench.loadgen`), each with its own loop.

Run alone: `python -m bench.relay [--quick]` prints its JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from bench import servers
from bench.loadgen import Sync, Workers
from bench.procs import Proc
from bench.rawhttp import HttpConnection
from bench.session_clients import WsSession
from bench.stats import CpuMeter, median, percentile
from bench.streams import StreamRecord, direct_stream, seed_stream, session_stream

__all__ = ["RelayConfig", "run", "summarize"]

STEADY_MARGIN_S = 0.25  # after the last stream starts, time for its first token to arrive


@dataclass
class RelayConfig:
    streams: list[int] = field(default_factory=lambda: [100, 500])
    token_rate: float = 20.0
    tokens: int = 160
    ramp_s: float = 2.0
    repeats: int = 2
    workers: int = 2
    targets: tuple[str, ...] = ("direct", "seed", "sluice", "sluice-http")
    budget_s: float = 360.0  # past this, repeats after the first are skipped

    @classmethod
    def quick(cls) -> RelayConfig:
        return cls(streams=[20], token_rate=50.0, tokens=40, ramp_s=0.2, repeats=1, workers=2)

    @property
    def generator(self) -> str:
        return (
            f"{self.workers} forked Python processes (asyncio; websockets client for WS, "
            "bench.rawhttp for HTTP)"
        )


async def _open(kind: str, port: int) -> WsSession | HttpConnection:
    if kind == "sluice":
        session = WsSession(f"ws://127.0.0.1:{port}/v1/ws")
        await session.open()
        return session
    connection = HttpConnection(port)
    await connection.connect()
    return connection


async def _one(kind: str, conn: WsSession | HttpConnection, spec: dict[str, Any], k: int) -> StreamRecord:
    prompt = f"stream {k}: tell me about the river"
    args = (spec["model"], prompt, spec["tokens"])
    if isinstance(conn, WsSession):
        return await session_stream(conn, *args)
    if kind in ("seed", "sluice-http"):
        return await seed_stream(conn, *args)
    return await direct_stream(conn, *args)


async def _worker(spec: dict[str, Any], sync: Sync) -> dict[str, Any]:
    """Open this worker's share of streams, start each on schedule, and summarise what arrived."""
    kind, port, indexes = spec["kind"], spec["port"], spec["indexes"]
    opening = asyncio.Semaphore(50)

    async def opened() -> WsSession | HttpConnection:
        async with opening:
            return await _open(kind, port)

    conns = await asyncio.gather(*(opened() for _ in indexes))
    await sync.checkpoint()  # everyone connected: the parent now sets the start time
    await sync.checkpoint()
    start_at = sync.start_at
    cpu = CpuMeter()
    cpu.start()

    async def stream(k: int, conn: WsSession | HttpConnection) -> StreamRecord:
        await asyncio.sleep(max(0.0, start_at + spec["ramp_s"] * k / spec["total"] - time.monotonic()))
        try:
            return await asyncio.wait_for(_one(kind, conn, spec, k), spec["stream_timeout_s"])
        except Exception as exc:  # a stream that fails counts as lost tokens, not a crash
            return StreamRecord(error=f"{type(exc).__name__}: {exc}"[:200])

    records = await asyncio.gather(*(stream(k, c) for k, c in zip(indexes, conns, strict=True)))
    cpu.stop()
    await sync.checkpoint()  # everyone finished: the parent reads the server's counters
    await sync.checkpoint()
    await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)
    interval = 1.0 / spec["token_rate"]
    # Steady state: every stream has started (and had time for its first token), none has ended.
    to_perf = time.perf_counter() - time.monotonic()  # the same clock on Linux; kept exact anyway
    steady_from = start_at + spec["ramp_s"] + STEADY_MARGIN_S + to_perf
    steady_to = start_at + spec["tokens"] * interval + to_perf
    gaps, steady, lateness, ttfts = [], [], [], []
    for record in records:
        times = record.token_times()
        for a, b in itertools.pairwise(times):
            gaps.append((b - a - interval) * 1000)
            if steady_from <= b <= steady_to:
                steady.append(gaps[-1])
        lateness += [(at - times[0] - i * interval) * 1000 for i, at in enumerate(times)]
        if record.ttft_s is not None:
            ttfts.append(record.ttft_s * 1000)
    return {
        "tokens": [r.tokens for r in records],
        "errors": [r.error for r in records if r.error],
        "gaps_ms": gaps,
        "steady_gaps_ms": steady,
        "lateness_ms": lateness,
        "ttft_ms": ttfts,
        "client_cpu_s": cpu.seconds,
    }


def summarize(parts: list[dict[str, Any]], *, streams: int, tokens: int, window_s: float) -> dict[str, Any]:
    per_stream = [count for part in parts for count in part["tokens"]]
    gaps = [g for part in parts for g in part["gaps_ms"]]
    steady = [g for part in parts for g in part["steady_gaps_ms"]]
    lateness = [v for part in parts for v in part["lateness_ms"]]
    ttfts = [v for part in parts for v in part["ttft_ms"]]
    errors = [e for part in parts for e in part["errors"]]
    received = sum(per_stream)
    return {
        "tokens_expected": streams * tokens,
        "tokens_received": received,
        "tokens_lost": sum(max(0, tokens - count) for count in per_stream)
        + tokens * (streams - len(per_stream)),
        "tokens_extra": sum(max(0, count - tokens) for count in per_stream),
        "stream_errors": len(errors),
        "error_samples": sorted(set(errors))[:5],
        "added_gap_p50_ms": percentile(steady, 50),
        "added_gap_p99_ms": percentile(steady, 99),
        "added_gap_max_ms": max(steady, default=float("nan")),
        "steady_tokens": len(steady),
        "all_added_gap_p99_ms": percentile(gaps, 99),
        "all_added_gap_max_ms": max(gaps, default=float("nan")),
        "lateness_p99_ms": percentile(lateness, 99),
        "ttft_p50_ms": percentile(ttfts, 50),
        "ttft_p99_ms": percentile(ttfts, 99),
        "window_s": window_s,
        "tokens_per_s": received / window_s if window_s > 0 else float("nan"),
        "client_cpu_pct": [100.0 * part["client_cpu_s"] / window_s for part in parts],
    }


def _measure(
    kind: str, port: int, proc: Proc | None, streams: int, model: str, config: RelayConfig
) -> dict[str, Any]:
    workers = max(1, min(config.workers, streams))
    stream_timeout = config.ramp_s + 3 * config.tokens / config.token_rate + 30.0
    specs = [
        {
            "kind": kind,
            "port": port,
            "model": model,
            "tokens": config.tokens,
            "token_rate": config.token_rate,
            "ramp_s": config.ramp_s,
            "total": streams,
            "indexes": list(range(w, streams, workers)),
            "stream_timeout_s": stream_timeout,
        }
        for w in range(workers)
    ]
    with Workers(_worker, specs, timeout=stream_timeout + 120.0) as pool:
        pool.checkpoint()  # all connected
        pool.sync.start_at = time.monotonic() + 0.2
        cpu0 = proc.cpu_seconds() if proc is not None else 0.0
        pool.checkpoint()
        pool.checkpoint(timeout=stream_timeout + 60.0)  # all finished
        window = time.monotonic() - pool.sync.start_at
        cpu = (proc.cpu_seconds() - cpu0) if proc is not None else None
        pool.checkpoint()
        parts = pool.results()
    result = summarize(parts, streams=streams, tokens=config.tokens, window_s=window)
    result["server_cpu_s"] = cpu
    tokens = result["tokens_received"]
    result["cpu_s_per_1k_tokens"] = 1000 * cpu / tokens if cpu is not None and tokens else None
    return result


@contextlib.contextmanager
def _target(kind: str, upstream: servers.Server) -> Iterator[tuple[int, Proc | None]]:
    if kind == "direct":
        yield upstream.port, None
    elif kind == "seed":
        with servers.seed(ollama_url=upstream.url) as seed:
            yield seed.port, seed.proc
    else:  # "sluice" (WebSocket) or "sluice-http" (its seed-compatible SSE endpoint)
        with servers.sluice(ollama_url=upstream.url, label="relay") as sluice:
            yield sluice.port, sluice.proc


_SCALARS = ("cpu_s_per_1k_tokens", "added_gap_p50_ms", "added_gap_p99_ms", "added_gap_max_ms")
_SCALARS += ("all_added_gap_p99_ms", "all_added_gap_max_ms", "steady_tokens")
_SCALARS += ("lateness_p99_ms", "ttft_p50_ms", "ttft_p99_ms", "tokens_per_s", "server_cpu_s")


def _combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians of the scalar figures over repeats; losses and errors summed (one loss is one too many)."""
    out: dict[str, Any] = {key: median([r[key] for r in runs if r.get(key) is not None]) for key in _SCALARS}
    for key in ("tokens_expected", "tokens_received", "tokens_lost", "tokens_extra", "stream_errors"):
        out[key] = sum(r[key] for r in runs)
    out["error_samples"] = sorted({e for r in runs for e in r["error_samples"]})[:5]
    out["client_cpu_pct"] = [pct for r in runs for pct in r["client_cpu_pct"]]
    out["repeats"] = runs
    return out


def run(config: RelayConfig) -> dict[str, Any]:
    targets: dict[str, Any] = {}
    unavailable: dict[str, str] = {}
    out: dict[str, Any] = {
        "generator": config.generator,
        "token_rate": config.token_rate,
        "tokens_per_stream": config.tokens,
        "targets": targets,
        "unavailable": unavailable,
    }
    reason = servers.emulator_unavailable()
    if reason is not None:
        unavailable.update(dict.fromkeys(config.targets, reason))
        return out
    if (reason := servers.sluice_unavailable()) is not None:
        unavailable.update({kind: reason for kind in config.targets if kind.startswith("sluice")})
    with servers.emulator(token_rate=config.token_rate, tokens=config.tokens) as upstream:
        model = servers.emulator_model(upstream)
        out["model"] = model
        deadline = time.monotonic() + config.budget_s
        for kind in config.targets:
            if kind in unavailable:
                continue
            try:
                with _target(kind, upstream) as (port, proc):
                    by_streams = {}
                    for n in config.streams:
                        runs = [_measure(kind, port, proc, n, model, config)]
                        while len(runs) < config.repeats and time.monotonic() < deadline:
                            runs.append(_measure(kind, port, proc, n, model, config))
                        by_streams[str(n)] = _combine(runs)
                    targets[kind] = by_streams
            except Exception as exc:  # one broken target must not end the whole run
                targets.pop(kind, None)
                unavailable[kind] = f"{type(exc).__name__}: {exc}"[:800]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--streams", type=int, nargs="+")
    parser.add_argument("--targets", nargs="+")
    args = parser.parse_args(argv)
    config = RelayConfig.quick() if args.quick else RelayConfig()
    if args.streams:
        config.streams = args.streams
    if args.targets:
        config.targets = tuple(args.targets)
    result = run(config)
    for target in result["targets"].values():
        for figures in target.values():
            figures.pop("repeats", None)
    sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
