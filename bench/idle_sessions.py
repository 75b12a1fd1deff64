"""Benchmark 5: server memory per idle WebSocket session, at 1,000 and 10,000 open sessions.

One sluice process (no local generation model, no Ollama). Several forked client processes open
WebSocket sessions (`hello` → `welcome`, then silence; the server's own pings keep them alive) a
bounded number at a time, level by level. At each level every client checkpoints, the server is
left to settle, and its RSS (process tree, psutil) is read. Per-session figure:
(RSS at the level - RSS before any session) / sessions open. File-descriptor limits are raised in
the runner (inherited by the server) and in every client process.

Run alone: `python -m bench.idle_sessions [--quick]` prints its JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from bench import servers
from bench.loadgen import Sync, Workers
from bench.procs import raise_nofile
from bench.session_clients import WsSession

__all__ = ["IdleConfig", "run"]


@dataclass
class IdleConfig:
    levels: list[int] = field(default_factory=lambda: [1000, 10000])
    workers: int = 4
    open_concurrency: int = 64
    settle_s: float = 3.0
    open_timeout_s: float = 150.0

    @classmethod
    def quick(cls) -> IdleConfig:
        return cls(levels=[100, 200], workers=2, settle_s=1.0, open_timeout_s=60.0)

    @property
    def generator(self) -> str:
        return f"{self.workers} forked Python processes (asyncio, websockets client; one socket per session)"


async def _worker(spec: dict[str, Any], sync: Sync) -> dict[str, Any]:
    sessions: list[WsSession] = []
    failures: list[str] = []
    gate = asyncio.Semaphore(spec["open_concurrency"])

    async def open_one() -> None:
        async with gate:
            session = WsSession(spec["url"])
            try:
                await session.open(limit_s=60.0)
                sessions.append(session)
            except Exception as exc:  # counted and reported; the level is measured on what opened
                failures.append(f"{type(exc).__name__}: {exc}"[:200])

    for share in spec["shares"]:
        await asyncio.gather(*(open_one() for _ in range(share - len(sessions) - len(failures))))
        spec["open_counts"][spec["index"]] = len(sessions)
        await sync.checkpoint(spec["open_timeout_s"])  # this level is open
        await sync.checkpoint(spec["open_timeout_s"])  # the parent has measured
    extensions = sessions[0].extensions if sessions else []
    await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)
    return {
        "opened": len(sessions),
        "failures": failures[:5],
        "failed": len(failures),
        "extensions": extensions,
    }


def run(config: IdleConfig) -> dict[str, Any]:
    raise_nofile()
    unavailable: dict[str, str] = {}
    out: dict[str, Any] = {"generator": config.generator, "levels": {}, "unavailable": unavailable}
    reason = servers.sluice_unavailable()
    if reason is not None:
        unavailable["sluice"] = reason
        return out
    try:
        with servers.sluice(label="idle_sessions") as sluice:

            async def warm() -> None:
                for _ in range(5):
                    session = WsSession(sluice.ws_url)
                    await session.open()
                    await session.close()

            asyncio.run(warm())
            time.sleep(config.settle_s)
            rss0 = sluice.proc.rss_bytes()
            out["rss_before_bytes"] = rss0
            workers = max(1, config.workers)
            open_counts = multiprocessing.get_context("fork").Array("i", workers)
            specs = [
                {
                    "index": w,
                    "open_counts": open_counts,
                    "url": sluice.ws_url,
                    "shares": [
                        level // workers + (1 if w < level % workers else 0) for level in config.levels
                    ],
                    "open_concurrency": config.open_concurrency,
                    "open_timeout_s": config.open_timeout_s,
                }
                for w in range(workers)
            ]
            started = time.monotonic()
            with Workers(_worker, specs, timeout=config.open_timeout_s + 60.0) as pool:
                for level in config.levels:
                    pool.checkpoint(config.open_timeout_s)
                    opened_s = time.monotonic() - started
                    time.sleep(config.settle_s)
                    rss = sluice.proc.rss_bytes()
                    # Per-session memory is only honest over the sessions that did open.
                    opened = sum(open_counts[:])
                    out["levels"][str(level)] = {
                        "sessions": opened,
                        "rss_bytes": rss,
                        "rss_per_session_bytes": (rss - rss0) / opened if opened else None,
                        "open_s": opened_s,
                        "server_alive": sluice.proc.alive(),
                    }
                    pool.checkpoint(config.open_timeout_s)
                    started = time.monotonic()
                parts = pool.results()
            opened = sum(p["opened"] for p in parts)
            out["opened"] = opened
            out["failed"] = sum(p["failed"] for p in parts)
            out["failure_samples"] = [f for p in parts for f in p["failures"]][:5]
            out["ws_extensions"] = parts[0]["extensions"] if parts else []
    except Exception as exc:  # one broken target must not end the whole run
        unavailable["sluice"] = f"{type(exc).__name__}: {exc}"[:800]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--levels", type=int, nargs="+")
    args = parser.parse_args(argv)
    config = IdleConfig.quick() if args.quick else IdleConfig()
    if args.levels:
        config.levels = args.levels
    result = run(config)
    sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
