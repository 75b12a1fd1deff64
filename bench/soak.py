"""The resume soak of DESIGN.md's reliability list, full size: 1,000 forced disconnects per transport.

    .venv/bin/python bench/soak.py --disconnects 1000                 # ws, sse and mixed
    .venv/bin/python bench/soak.py --disconnects 300 --transports ws  # one transport
    .venv/bin/python bench/soak.py --disconnects 1000 --nodes 2       # cluster: two nodes, one Redis

Starts the Ollama emulator (in this process) and ``sluice serve`` (a subprocess, the same settings
as ``tests/reliability``) on 127.0.0.1, runs `tests.reliability.resume.run_soak` once per
transport — generations streamed on one session while the client resets its TCP connection after
a random number of events and resumes — and prints one summary line per transport. Every
generation's text must equal the emulator's exactly and seq must be gap-free and never repeated;
the first violation stops the run with exit status 1. ``--nodes 2`` starts a ``redis-server``
(`tests.support.redis_server`, a free loopback port, no persistence) and two nodes sharing it
(``SLUICE_REDIS_URL``); the session opens on the first and every resume goes to either node at
random. It stops by itself (the disconnect count, or ``--time-limit`` per transport) and stops
every server it started on exit. ``--json PATH`` also writes the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `tests` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.reliability.links import LinkClosed
from tests.reliability.resume import SoakConfig, SoakResult, run_soak
from tests.reliability.serving import sse_available, start_reliability_server
from tests.support.ollama_emulator import Emulator, start_emulator
from tests.support.redis_server import RedisServer
from tests.support.server import ServerProcess

__all__ = ["main"]

TRANSPORTS = ("ws", "sse", "mixed")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Resume soak: forced disconnects, zero tokens lost")
    parser.add_argument("--disconnects", type=int, default=1000, help="forced disconnects per transport")
    parser.add_argument("--transports", default=",".join(TRANSPORTS), help="comma-separated: ws,sse,mixed")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--concurrent", type=int, default=2, help="generations in flight at once")
    parser.add_argument("--token-rate", type=float, default=400.0, help="emulated pieces/s per stream")
    parser.add_argument("--tokens", type=int, default=600, help="pieces per generation")
    parser.add_argument("--time-limit", type=float, default=300.0, help="seconds per transport, at most")
    parser.add_argument(
        "--nodes", type=int, choices=(1, 2), default=1, help="2: two nodes sharing one redis-server"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser


@contextlib.contextmanager
def _servers(emu: Emulator, nodes: int) -> Iterator[list[ServerProcess]]:
    """One node, or a redis-server and two nodes sharing it; all stopped on exit."""
    env = {"SLUICE_OLLAMA_URLS": emu.url}
    with contextlib.ExitStack() as stack:
        if nodes > 1:
            redis = RedisServer()
            stack.callback(redis.close)
            redis.start()
            env |= {"SLUICE_REDIS_URL": redis.url}
        servers: list[ServerProcess] = []
        for index in range(nodes):
            node_env = env | ({"SLUICE_NODE_ID": "ab"[index]} if nodes > 1 else {})
            server = start_reliability_server(node_env)
            stack.callback(server.stop)
            servers.append(server)
        yield servers


async def _run(
    args: argparse.Namespace,
    emu: Emulator,
    base_urls: list[str],
    transports: list[str],
    results: list[SoakResult],
) -> None:
    for transport in transports:
        emu.reset()
        config = SoakConfig(
            transport=transport,  # type: ignore[arg-type]
            disconnects=args.disconnects,
            seed=args.seed,
            concurrent=args.concurrent,
            time_limit_s=args.time_limit,
        )
        nodes = base_urls if len(base_urls) > 1 else ()
        result = await run_soak(config, base_url=base_urls[0], emulator=emu, nodes=nodes)
        print(result.summary(), flush=True)
        results.append(result)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    transports = [t for t in args.transports.split(",") if t]
    unknown = set(transports) - set(TRANSPORTS)
    if unknown:
        raise SystemExit(f"unknown transports: {sorted(unknown)}")
    load = os.getloadavg()
    print(
        f"resume soak: {args.disconnects} disconnects per transport, {args.nodes} node(s), "
        f"on {platform.node()}, load {load[0]:.2f}"
    )
    started = time.monotonic()
    with (
        start_emulator(token_rate=args.token_rate, tokens=args.tokens) as emu,
        _servers(emu, args.nodes) as servers,
    ):
        base_urls = [server.url for server in servers]
        if not sse_available(base_urls[0]):
            skipped = [t for t in transports if t != "ws"]
            if skipped:
                print(f"skipping {', '.join(skipped)}: the SSE session endpoints are not served")
            transports = [t for t in transports if t == "ws"]
        results: list[SoakResult] = []
        try:
            asyncio.run(_run(args, emu, base_urls, transports, results))
        except (AssertionError, LinkClosed) as error:
            traceback.print_exc()
            failed = transports[len(results)]
            print(
                f"FAILED in {failed}: the soak found a lost, repeated or wrong event, or a live link closed (above)"
            )
            _write_json(
                args,
                load,
                results,
                failure={
                    "transport": failed,
                    "error": repr(error),
                    "notes": "; ".join(getattr(error, "__notes__", [])),
                },
            )
            return 1
    total = sum(r.disconnects for r in results)
    print(
        f"total: {total} forced disconnects, all resumed, 0 tokens lost or duplicated, {time.monotonic() - started:.0f} s"
    )
    _write_json(args, load, results)
    return 0 if all(not r.stopped_early for r in results) else 1


def _write_json(
    args: argparse.Namespace,
    load: tuple[float, float, float],
    results: list[SoakResult],
    failure: dict[str, str] | None = None,
) -> None:
    if args.json is None:
        return
    rows = [dataclasses.asdict(r) | {"summary": r.summary()} for r in results]
    report = {"nodes": args.nodes, "cpu": _cpu_model(), "load_start": load, "results": rows}
    if failure is not None:
        report["failure"] = failure
    args.json.write_text(json.dumps(report, indent=2, default=str))


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or "unknown"


if __name__ == "__main__":
    sys.exit(main())
