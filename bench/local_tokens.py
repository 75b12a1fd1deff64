"""In-process measurement of the local decode loop: aggregate tokens/s for 1, 2, 4 concurrent requests.

Loads `LocalGenerator` (no server, no sockets) and, in each round, runs 1, then 2, then 4
greedy requests at once ("Write a long story about ...", ``max_tokens`` fixed); aggregate
tokens/s is the completion tokens of all requests over the wall time from the first request to
the last result. Ratios are against the 1-request figure of the same round, so a machine shared
with other work still gives comparable numbers; every round is printed, then the medians.
The end-to-end figure through the server is `bench.local_generation`.

Run: ``python -m bench.local_tokens [--rounds 3] [--max-tokens 48] [--threads N] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import torch

from server.backends.base import GenerationRequest, GenerationResult, SamplingOptions
from server.backends.local import LocalGenerator
from server.settings import Settings

__all__ = ["main", "measure"]

_TOPICS = ("a lighthouse keeper", "a river pilot", "a mountain baker", "a city gardener")


async def _one(gen: LocalGenerator, topic: str, max_tokens: int) -> GenerationResult:
    request = GenerationRequest(
        model="smollm2:135m",
        prompt=f"Write a long story about {topic}.",
        options=SamplingOptions(temperature=0.0, max_tokens=max_tokens),
    )
    async for item in gen.generate(request):
        if isinstance(item, GenerationResult):
            return item
    raise RuntimeError("no result")


async def _concurrent(gen: LocalGenerator, k: int, max_tokens: int) -> dict[str, Any]:
    started, cpu_started = time.perf_counter(), time.process_time()
    results = await asyncio.gather(*(_one(gen, _TOPICS[i % len(_TOPICS)], max_tokens) for i in range(k)))
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    tokens = sum(r.completion_tokens for r in results)
    return {
        "k": k,
        "tokens": tokens,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 2),
        # Less sensitive to other processes taking the CPU than wall time (all threads counted).
        "tokens_per_cpu_s": round(tokens / cpu, 2),
    }


async def measure(gen: LocalGenerator, *, rounds: int, max_tokens: int, levels: list[int]) -> dict[str, Any]:
    """Run the rounds and return every figure plus the median ratios against k=1."""
    await _concurrent(gen, 1, 4)  # warm-up: first-call allocations, lazy imports
    per_round = []
    for index in range(rounds):
        # Alternate the order so load that drifts during a round does not favour one level.
        order = levels if index % 2 == 0 else levels[::-1]
        by_k = {k: await _concurrent(gen, k, max_tokens) for k in order}
        figures = [by_k[k] for k in levels]
        base = figures[0]["tokens_per_s"]
        base_cpu = figures[0]["tokens_per_cpu_s"]
        for figure in figures:
            figure["ratio"] = round(figure["tokens_per_s"] / base, 2)
            figure["cpu_ratio"] = round(figure["tokens_per_cpu_s"] / base_cpu, 2)
        per_round.append(figures)
        line = "  ".join(
            f"k={f['k']}: {f['tokens_per_s']:6.2f} tok/s ({f['ratio']:.2f}x; per CPU-s {f['cpu_ratio']:.2f}x)"
            for f in figures
        )
        print(f"round {index + 1}: {line}", flush=True)
    medians = {
        str(k): {
            "tokens_per_s": statistics.median(r[i]["tokens_per_s"] for r in per_round),
            "ratio": statistics.median(r[i]["ratio"] for r in per_round),
            "cpu_ratio": statistics.median(r[i]["cpu_ratio"] for r in per_round),
        }
        for i, k in enumerate(levels)
    }
    return {"max_tokens": max_tokens, "rounds": per_round, "median": medians}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--levels", default="1,2,4", help="concurrency levels; the first is the baseline")
    parser.add_argument("--threads", type=int, help="torch threads (default: cores - 1, at least 1)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    gen = LocalGenerator.load(Settings(ollama_urls=[]), threads=args.threads)
    try:
        print(
            f"loaded in {gen.model.load_seconds:.2f} s; {os.cpu_count()} cores, {torch.get_num_threads()}"
            f" torch threads; load average {os.getloadavg()[0]:.1f}"
        )
        levels = [int(k) for k in args.levels.split(",")]
        result = asyncio.run(measure(gen, rounds=args.rounds, max_tokens=args.max_tokens, levels=levels))
    finally:
        gen.close()
    result["load_average_after"] = os.getloadavg()[0]
    for k, figure in result["median"].items():
        print(
            f"median k={k}: {figure['tokens_per_s']:.2f} tok/s, {figure['ratio']:.2f}x k={levels[0]}"
            f" (tokens per CPU-second: {figure['cpu_ratio']:.2f}x)"
        )
    if args.json:
        args.json.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
