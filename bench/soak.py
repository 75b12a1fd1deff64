"""The resume soak of DESIGN.md's reliability list, full size: 1,000 forced disconnects per transport.

    .venv/bin/python bench/soak.py --disconnects 1000                 # ws, sse and mixed
    .venv/bin/python bench/soak.py --disconnects 300 --transports ws  # one transport

Starts the Ollama emulator (in this process) and ``sluice serve`` (a subprocess, the same settings
as ``tests/reliability``) on 127.0.0.1, runs `tests.reliability.resume.run_soak` once per
transport — generations streamed on one session while the client resets its TCP connection after
a random number of events and resumes — and prints one summary line per transport. Every
generation's text must equal the emulator's exactly and seq must be gap-free and never repeated;
the first violation stops the run with exit status 1. It stops by itself (the disconnect count,
or ``--time-limit`` per transport) and stops both servers on exit. ``--json PATH`` also writes
the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `tests` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.reliability.resume import SoakConfig, SoakResult, run_soak
from tests.reliability.serving import sse_available, start_reliability_server
from tests.support.ollama_emulator import Emulator, start_emulator

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
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser


async def _run(
    args: argparse.Namespace, emu: Emulator, base_url: str, transports: list[str]
) -> list[SoakResult]:
    results = []
    for transport in transports:
        emu.reset()
        config = SoakConfig(
            transport=transport,  # type: ignore[arg-type]
            disconnects=args.disconnects,
            seed=args.seed,
            concurrent=args.concurrent,
            time_limit_s=args.time_limit,
        )
        result = await run_soak(config, base_url=base_url, emulator=emu)
        print(result.summary(), flush=True)
        results.append(result)
    return results


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    transports = [t for t in args.transports.split(",") if t]
    unknown = set(transports) - set(TRANSPORTS)
    if unknown:
        raise SystemExit(f"unknown transports: {sorted(unknown)}")
    load = os.getloadavg()
    print(
        f"resume soak: {args.disconnects} disconnects per transport on {platform.node()}, load {load[0]:.2f}"
    )
    started = time.monotonic()
    with start_emulator(token_rate=args.token_rate, tokens=args.tokens) as emu:
        server = start_reliability_server({"SLUICE_OLLAMA_URLS": emu.url})
        try:
            if not sse_available(server.url):
                skipped = [t for t in transports if t != "ws"]
                if skipped:
                    print(f"skipping {', '.join(skipped)}: the SSE session endpoints are not served")
                transports = [t for t in transports if t == "ws"]
            try:
                results = asyncio.run(_run(args, emu, server.url, transports))
            except AssertionError:
                traceback.print_exc()
                print("FAILED: the soak found a lost, repeated or wrong event (above)")
                return 1
        finally:
            server.stop()
    total = sum(r.disconnects for r in results)
    print(
        f"total: {total} forced disconnects, all resumed, 0 tokens lost or duplicated, {time.monotonic() - started:.0f} s"
    )
    if args.json is not None:
        rows = [dataclasses.asdict(r) | {"summary": r.summary()} for r in results]
        args.json.write_text(json.dumps({"load_start": load, "results": rows}, indent=2, default=str))
    return 0 if all(not r.stopped_early for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
