"""Benchmark 3: time to first token added by the server, against reading the emulator directly.

One request at a time, rotating through the targets each round so drift on the shared machine
hits them all alike: the emulator read directly (`POST /api/generate`), sluice over a WebSocket
session opened beforehand, and the seed relay on a keep-alive connection. TTFT is from the client
sending its request to the first token arriving. The figure is the median TTFT of each relay
minus the direct median. Emulator: unpaced, a few tokens per answer, no first-token delay.

Run alone: `python -m bench.ttft [--quick]` prints its JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson

from bench import servers
from bench.rawhttp import HttpConnection
from bench.session_clients import WsSession
from bench.stats import median, percentile
from bench.streams import StreamRecord, direct_stream, seed_stream, session_stream

__all__ = ["TtftConfig", "run"]

GENERATOR = "1 Python asyncio process, one request at a time (websockets client, bench.rawhttp)"
Reader = Callable[[str], Awaitable[StreamRecord]]


@dataclass
class TtftConfig:
    rounds: int = 60
    warmup_rounds: int = 5
    tokens: int = 4
    budget_s: float = 90.0  # past this, the remaining rounds are skipped

    @classmethod
    def quick(cls) -> TtftConfig:
        return cls(rounds=10, warmup_rounds=2)


async def _measure(readers: dict[str, Reader], config: TtftConfig) -> dict[str, Any]:
    samples: dict[str, list[float]] = {name: [] for name in readers}
    errors: dict[str, int] = dict.fromkeys(readers, 0)
    names = list(readers)
    deadline = time.monotonic() + config.budget_s
    for round_ in range(config.warmup_rounds + config.rounds):
        if time.monotonic() > deadline:
            break
        order = names[round_ % len(names) :] + names[: round_ % len(names)]
        for name in order:
            try:
                record = await asyncio.wait_for(readers[name](f"round {round_}: hello"), 30.0)
            except Exception as exc:  # counted; the other targets go on
                record = StreamRecord(error=f"{type(exc).__name__}: {exc}")
            if round_ < config.warmup_rounds:
                continue
            if record.ttft_s is None or record.error:
                errors[name] += 1
            else:
                samples[name].append(record.ttft_s * 1000)
    direct = median(samples["direct"])
    out: dict[str, Any] = {}
    for name, values in samples.items():
        out[name] = {
            "ttft_p50_ms": median(values),
            "ttft_p90_ms": percentile(values, 90),
            "added_p50_ms": median(values) - direct,
            "samples": len(values),
            "errors": errors[name],
        }
    return out


def run(config: TtftConfig) -> dict[str, Any]:
    unavailable: dict[str, str] = {}
    out: dict[str, Any] = {"generator": GENERATOR, "targets": {}, "unavailable": unavailable}
    reason = servers.emulator_unavailable()
    if reason is not None:
        unavailable.update(dict.fromkeys(("direct", "seed", "sluice"), reason))
        return out
    sluice_reason = servers.sluice_unavailable()
    if sluice_reason is not None:
        unavailable["sluice"] = sluice_reason
    with contextlib.ExitStack() as stack:
        upstream = stack.enter_context(servers.emulator(token_rate=0, tokens=config.tokens))
        model = servers.emulator_model(upstream)
        seed = stack.enter_context(servers.seed(ollama_url=upstream.url))
        sluice = None
        if sluice_reason is None:
            try:
                sluice = stack.enter_context(servers.sluice(ollama_url=upstream.url, label="ttft"))
            except Exception as exc:  # report, and still measure the baselines
                unavailable["sluice"] = f"{type(exc).__name__}: {exc}"[:800]

        async def main() -> dict[str, Any]:
            direct_conn, seed_conn = HttpConnection(upstream.port), HttpConnection(seed.port)
            readers: dict[str, Reader] = {
                "direct": lambda prompt: direct_stream(direct_conn, model, prompt, config.tokens),
                "seed": lambda prompt: seed_stream(seed_conn, model, prompt, config.tokens),
            }
            session = None
            if sluice is not None:
                session = WsSession(sluice.ws_url)
                await session.open()
                readers["sluice"] = lambda prompt: session_stream(session, model, prompt, config.tokens)
            try:
                return await _measure(readers, config)
            finally:
                await direct_conn.close()
                await seed_conn.close()
                if session is not None:
                    await session.close()

        out["targets"] = asyncio.run(main())
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    result = run(TtftConfig.quick() if args.quick else TtftConfig())
    sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
