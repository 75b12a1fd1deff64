"""Benchmark 6: throughput of one generation stream over the SSE fallback against the WebSocket.

The emulator is unpaced (it writes as fast as the socket takes it) and in its fast mode
(`lines_per_write` NDJSON lines per write), so the upstream is not what caps the stream: the
emulator read directly ("direct") shows its ceiling, and every run records the upstream's CPU
share beside the server's. One session per run: a WebSocket session (`/v1/ws`), or an SSE session
(`POST /v1/sessions`, its events stream, `POST .../messages`), the same upstream and the same
tokens for both. Throughput is tokens received (counted from the text) over the time from sending
`generate` to its terminal message; the server's CPU per token (process time over tokens) is
recorded beside it, which compares the transports even when the reader or the shared cores set
the pace, and per delta received: a reader that falls behind is sent merged deltas (the runtime
merges under backpressure), which lowers the server's cost per token without the transport being
any cheaper. So does the delta hold window (`Settings.delta_hold_s`, both transports): a stream
this fast is sent about one delta per window, so the deltas count says how much was merged.
Runs alternate between transports; medians are reported.

Both readers are of one cost class, so that the readers do not decide the comparison: the SSE
stream is read by `bench.rawhttp`, the WebSocket ("ws") by `bench.rawws`. "ws_websockets" is the
same WebSocket read by the `websockets` client, which costs the reader about twice as much per
message; it is reported beside, not compared.

Run alone: `python -m bench.sse_vs_ws [--quick]` prints its JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import dataclass
from typing import Any

import orjson

from bench import servers
from bench.rawhttp import HttpConnection
from bench.session_clients import RawWsSession, SseSession, WsSession
from bench.stats import CpuMeter, median
from bench.streams import StreamRecord, direct_stream, session_stream

__all__ = ["SseWsConfig", "run"]

GENERATOR = (
    "1 Python asyncio process (bench.rawws WebSocket reader, bench.rawhttp SSE reader; "
    "ws_websockets: the websockets client)"
)


@dataclass
class SseWsConfig:
    tokens: int = 30000  # per generate (a request's max_tokens is at most 32768)
    generates: int = 8  # one after another per run, so each run's CPU figures span seconds
    lines_per_write: int = 4  # the emulator's fast mode: its cost per token well below the server's
    repeats: int = 3
    run_limit_s: float = 60.0
    budget_s: float = 120.0  # past this, repeats after the first are skipped

    @classmethod
    def quick(cls) -> SseWsConfig:
        return cls(tokens=2000, generates=2, repeats=1, run_limit_s=30.0)


async def _one(kind: str, port: int, model: str, tokens: int, generates: int) -> tuple[StreamRecord, float]:
    """`generates` streams of `tokens` one after another on one connection or session, as one record."""
    prompt = "one long stream"
    total, seconds = StreamRecord(), 0.0
    session: RawWsSession | WsSession | SseSession | None = None
    conn: HttpConnection | None = None
    if kind == "direct":
        conn = HttpConnection(port)
    else:
        if kind == "ws":
            session = RawWsSession(port)
        elif kind == "ws_websockets":
            session = WsSession(f"ws://127.0.0.1:{port}/v1/ws")
        else:
            session = SseSession(port)
        await session.open()
    try:
        for _ in range(generates):
            if conn is not None:
                record = await direct_stream(conn, model, prompt, tokens)
            else:
                assert session is not None
                record = await session_stream(session, model, prompt, tokens)
            ended = record.arrivals[-1][0] if record.arrivals else time.perf_counter()
            seconds += ended - record.sent_at
            total.arrivals += record.arrivals
            total.error = total.error or record.error
    finally:
        if conn is not None:
            await conn.close()
        if session is not None:
            await session.close()
    return total, seconds


def _sample(
    record: StreamRecord, seconds: float, client_s: float, server_s: float | None, upstream_s: float
) -> dict[str, Any]:
    """One run's figures (``server_s`` None: no server in between). A CPU share near 100 % says
    that process set the pace."""
    tokens = record.tokens
    if server_s is None:
        server = {"server_us_per_token": None, "server_us_per_delta": None, "server_cpu_pct": None}
    else:
        server = {
            "server_us_per_token": 1e6 * server_s / tokens if tokens else None,
            # Per delta the client received: a reader that falls behind gets merged deltas, which
            # makes the server cheaper per token; per delta the transports compare at equal framing.
            "server_us_per_delta": 1e6 * server_s / len(record.arrivals) if record.arrivals else None,
            "server_cpu_pct": 100.0 * server_s / seconds if seconds > 0 else None,
        }
    return server | {
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds if seconds > 0 else None,
        "deltas": len(record.arrivals),
        "upstream_us_per_token": 1e6 * upstream_s / tokens if tokens else None,
        "client_cpu_pct": 100.0 * client_s / seconds if seconds > 0 else None,
        "upstream_cpu_pct": 100.0 * upstream_s / seconds if seconds > 0 else None,
        "error": record.error,
    }


def run(config: SseWsConfig) -> dict[str, Any]:
    unavailable: dict[str, str] = {}
    targets: dict[str, Any] = {}
    out: dict[str, Any] = {"generator": GENERATOR, "tokens": config.tokens, "targets": targets}
    out["generates_per_run"] = config.generates
    out["unavailable"] = unavailable
    reason = servers.emulator_unavailable() or servers.sluice_unavailable()
    if reason is not None:
        unavailable.update(dict.fromkeys(("ws", "sse"), reason))
        return out
    out["upstream_lines_per_write"] = config.lines_per_write
    with servers.emulator(
        token_rate=0, tokens=config.tokens, lines_per_write=config.lines_per_write
    ) as upstream:
        model = servers.emulator_model(upstream)
        try:
            with servers.sluice(ollama_url=upstream.url, label="sse_vs_ws") as sluice:
                ports = {
                    "direct": upstream.port,
                    "ws": sluice.port,
                    "sse": sluice.port,
                    "ws_websockets": sluice.port,
                }
                samples: dict[str, list[dict[str, Any]]] = {kind: [] for kind in ports}
                deadline = time.monotonic() + config.budget_s
                for repeat in range(config.repeats):
                    if repeat and time.monotonic() > deadline:
                        out["skipped_repeats"] = config.repeats - repeat
                        break
                    for kind, port in ports.items():
                        cpu = CpuMeter()
                        cpu.start()
                        server0, upstream0 = sluice.proc.cpu_seconds(), upstream.proc.cpu_seconds()
                        try:
                            record, seconds = asyncio.run(
                                asyncio.wait_for(
                                    _one(kind, port, model, config.tokens, config.generates),
                                    config.run_limit_s,
                                )
                            )
                        except Exception as exc:  # report the failure, keep the other transport
                            samples[kind].append({"error": f"{type(exc).__name__}: {exc}"[:300]})
                            continue
                        client_s = cpu.stop()
                        server_s = sluice.proc.cpu_seconds() - server0 if kind != "direct" else None
                        upstream_s = upstream.proc.cpu_seconds() - upstream0
                        samples[kind].append(_sample(record, seconds, client_s, server_s, upstream_s))
        except Exception as exc:
            unavailable.update(dict.fromkeys(("ws", "sse"), f"{type(exc).__name__}: {exc}"[:800]))
            return out
    expected = config.tokens * config.generates
    for kind, runs in samples.items():
        good = [r for r in runs if not r.get("error") and r.get("tokens_per_s")]
        if not good:
            unavailable[kind] = str(runs[0].get("error") if runs else "no run")
        targets[kind] = {
            "tokens_per_s": median([r["tokens_per_s"] for r in good]),
            "server_us_per_token": median([r["server_us_per_token"] for r in good]),
            "server_us_per_delta": median([r["server_us_per_delta"] for r in good]),
            "upstream_us_per_token": median([r["upstream_us_per_token"] for r in good]),
            "deltas": median([r["deltas"] for r in good]),
            "tokens_lost": sum(max(0, expected - r.get("tokens", 0)) for r in runs),
            "runs": runs,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    result = run(SseWsConfig.quick() if args.quick else SseWsConfig())
    sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
