"""Benchmark 6: throughput of one generation stream over the SSE fallback against the WebSocket.

The emulator is unpaced (it writes as fast as the socket takes it), so the stream runs as fast as
the transport carries it. One session per run: a WebSocket session (`/v1/ws`), or an SSE session
(`POST /v1/sessions`, its events stream, `POST .../messages`). Throughput is tokens received
(counted from the text) over the time from sending `generate` to its terminal message; the
emulator read directly is the ceiling. Runs alternate between transports; medians are reported.

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
from bench.session_clients import SseSession, WsSession
from bench.stats import CpuMeter, median
from bench.streams import StreamRecord, direct_stream, session_stream

__all__ = ["SseWsConfig", "run"]

GENERATOR = "1 Python asyncio process (websockets client; bench.rawhttp SSE reader)"


@dataclass
class SseWsConfig:
    tokens: int = 20000
    repeats: int = 3
    run_limit_s: float = 60.0
    budget_s: float = 120.0  # past this, repeats after the first are skipped

    @classmethod
    def quick(cls) -> SseWsConfig:
        return cls(tokens=2000, repeats=1, run_limit_s=30.0)


async def _one(kind: str, port: int, model: str, tokens: int) -> tuple[StreamRecord, float]:
    prompt = "one long stream"
    if kind == "direct":
        conn = HttpConnection(port)
        try:
            record = await direct_stream(conn, model, prompt, tokens)
        finally:
            await conn.close()
    else:
        session: WsSession | SseSession = (
            WsSession(f"ws://127.0.0.1:{port}/v1/ws") if kind == "ws" else SseSession(port)
        )
        await session.open()
        try:
            record = await session_stream(session, model, prompt, tokens)
        finally:
            await session.close()
    ended = record.arrivals[-1][0] if record.arrivals else time.perf_counter()
    return record, ended - record.sent_at


def run(config: SseWsConfig) -> dict[str, Any]:
    unavailable: dict[str, str] = {}
    targets: dict[str, Any] = {}
    out: dict[str, Any] = {"generator": GENERATOR, "tokens": config.tokens, "targets": targets}
    out["unavailable"] = unavailable
    reason = servers.emulator_unavailable() or servers.sluice_unavailable()
    if reason is not None:
        unavailable.update(dict.fromkeys(("ws", "sse"), reason))
        return out
    with servers.emulator(token_rate=0, tokens=config.tokens) as upstream:
        model = servers.emulator_model(upstream)
        try:
            with servers.sluice(ollama_url=upstream.url, label="sse_vs_ws") as sluice:
                ports = {"direct": upstream.port, "ws": sluice.port, "sse": sluice.port}
                samples: dict[str, list[dict[str, Any]]] = {kind: [] for kind in ports}
                deadline = time.monotonic() + config.budget_s
                for repeat in range(config.repeats):
                    if repeat and time.monotonic() > deadline:
                        out["skipped_repeats"] = config.repeats - repeat
                        break
                    for kind, port in ports.items():
                        cpu = CpuMeter()
                        cpu.start()
                        try:
                            record, seconds = asyncio.run(
                                asyncio.wait_for(_one(kind, port, model, config.tokens), config.run_limit_s)
                            )
                        except Exception as exc:  # report the failure, keep the other transport
                            samples[kind].append({"error": f"{type(exc).__name__}: {exc}"[:300]})
                            continue
                        samples[kind].append(
                            {
                                "tokens": record.tokens,
                                "seconds": seconds,
                                "tokens_per_s": record.tokens / seconds if seconds > 0 else None,
                                "deltas": len(record.arrivals),
                                # The reader's own CPU share: near 100 % would mean it, not the
                                # server, sets the pace.
                                "client_cpu_pct": 100.0 * cpu.stop() / seconds if seconds > 0 else None,
                                "error": record.error,
                            }
                        )
        except Exception as exc:
            unavailable.update(dict.fromkeys(("ws", "sse"), f"{type(exc).__name__}: {exc}"[:800]))
            return out
    for kind, runs in samples.items():
        good = [r for r in runs if not r.get("error") and r.get("tokens_per_s")]
        if not good:
            unavailable[kind] = str(runs[0].get("error") if runs else "no run")
        targets[kind] = {
            "tokens_per_s": median([r["tokens_per_s"] for r in good]),
            "tokens_lost": sum(max(0, config.tokens - r.get("tokens", 0)) for r in runs),
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
