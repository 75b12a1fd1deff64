"""Benchmark: the local model's tokens/s under a JSON Schema against unconstrained, same prompts.

In-process (`LocalGenerator`, no server): each round runs the same prompts twice, once free and
once with ``format`` set to a schema, in alternating order (so load that drifts during a round
favours neither), at each concurrency level (k requests at once, one batch). The schema is a
long array of bounded strings, so both variants decode up to ``max_tokens`` and the figures
compare decode steps, not reply lengths. tokens/s is completion tokens over wall time from the
first request to the last result; tokens per CPU-second (process time, all threads) is less
sensitive to other work on a shared machine. The grammar's own cost per token (computing and
applying the mask, advancing by the sampled token) is read from the decode loop's counters,
and so is its share of the constrained batch's wall time.

Run: ``python -m bench.local_constrained [--rounds 3] [--max-tokens 48] [--levels 1,4] [--json PATH]``;
`bench.run` runs it as ``local_constrained``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from server.backends.base import GenerationRequest, GenerationResult, SamplingOptions
from server.backends.local import LocalGenerator
from server.settings import Settings

__all__ = ["ConstrainedConfig", "main", "measure", "run"]

GENERATOR = "in-process LocalGenerator (no server); k requests at once with asyncio.gather"
_PROMPTS = (
    "List the names of many animals.",
    "List many cities of the world.",
    "List the names of many fruits and vegetables.",
    "List many famous scientists.",
)
SCHEMA: dict[str, Any] = {
    "type": "array",
    "items": {"type": "string", "minLength": 1, "maxLength": 24},
    "minItems": 64,
}


@dataclass
class ConstrainedConfig:
    levels: list[int] = field(default_factory=lambda: [1, 4])
    max_tokens: int = 48
    rounds: int = 3

    @classmethod
    def quick(cls) -> ConstrainedConfig:
        return cls(levels=[1], max_tokens=8, rounds=1)


async def _one(gen: LocalGenerator, prompt: str, max_tokens: int, constrained: bool) -> GenerationResult:
    request = GenerationRequest(
        model="smollm2:135m",
        prompt=prompt,
        options=SamplingOptions(temperature=0.0, max_tokens=max_tokens),
        format=SCHEMA if constrained else None,
    )
    async for item in gen.generate(request):
        if isinstance(item, GenerationResult):
            return item
    raise RuntimeError("no result")


async def _batch(gen: LocalGenerator, k: int, max_tokens: int, constrained: bool) -> dict[str, Any]:
    masked, grammar_s = gen.grammar_stats
    started, cpu_started = time.perf_counter(), time.process_time()
    results = await asyncio.gather(
        *(_one(gen, _PROMPTS[i % len(_PROMPTS)], max_tokens, constrained) for i in range(k))
    )
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    masked_after, grammar_after = gen.grammar_stats
    tokens = sum(r.completion_tokens for r in results)
    figure: dict[str, Any] = {
        "tokens": tokens,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 2),
        "tokens_per_cpu_s": round(tokens / cpu, 2),
    }
    if constrained:
        figure["grammar_us_per_token"] = round((grammar_after - grammar_s) / (masked_after - masked) * 1e6, 1)
        # The decode thread's share of this batch's wall time spent in the grammar: what the
        # grammar can cost at most, and far less noisy than the wall-time ratio on a busy machine.
        figure["grammar_share"] = round((grammar_after - grammar_s) / wall, 4)
    return figure


async def measure(gen: LocalGenerator, config: ConstrainedConfig) -> dict[str, Any]:
    """Every round's figures, and per level the median ratios constrained / unconstrained."""
    await _batch(gen, 1, 4, False)  # warm-up: first-call allocations, the grammar's compile
    await _batch(gen, 1, 4, True)
    per_level: dict[str, Any] = {}
    for k in config.levels:
        rounds = []
        for index in range(config.rounds):
            order = (False, True) if index % 2 == 0 else (True, False)
            pair = {c: await _batch(gen, k, config.max_tokens, c) for c in order}
            free, schema = pair[False], pair[True]
            ratio = round(schema["tokens_per_s"] / free["tokens_per_s"], 3)
            cpu_ratio = round(schema["tokens_per_cpu_s"] / free["tokens_per_cpu_s"], 3)
            rounds.append({"unconstrained": free, "schema": schema, "ratio": ratio, "cpu_ratio": cpu_ratio})
            print(
                f"k={k} round {index + 1}: free {free['tokens_per_s']:.2f} tok/s, schema"
                f" {schema['tokens_per_s']:.2f} tok/s ({ratio:.3f}x; per CPU-s {cpu_ratio:.3f}x),"
                f" grammar {schema['grammar_us_per_token']} us/token ({schema['grammar_share']:.2%} of the time)",
                flush=True,
            )
        per_level[str(k)] = {
            "rounds": rounds,
            "median_ratio": statistics.median(r["ratio"] for r in rounds),
            "median_cpu_ratio": statistics.median(r["cpu_ratio"] for r in rounds),
            "median_grammar_us_per_token": statistics.median(
                r["schema"]["grammar_us_per_token"] for r in rounds
            ),
            "median_grammar_share": statistics.median(r["schema"]["grammar_share"] for r in rounds),
        }
    return {"max_tokens": config.max_tokens, "schema": SCHEMA, "levels": per_level}


def run(config: ConstrainedConfig) -> dict[str, Any]:
    """For `bench.run`: load the model in this process, measure, close."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    gen = LocalGenerator.load(Settings(ollama_urls=[]))
    try:
        result = asyncio.run(measure(gen, config))
    finally:
        gen.close()
    result["target"] = "tokens/s under a JSON Schema >= 0.85x unconstrained"
    result["generator"] = GENERATOR
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--levels", default="1,4")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    config = ConstrainedConfig(
        levels=[int(k) for k in args.levels.split(",")], max_tokens=args.max_tokens, rounds=args.rounds
    )
    load_before = os.getloadavg()[0]
    result = run(config)
    result["cpu"] = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        "unknown",
    )
    result["cores"] = os.cpu_count()
    result["load_average_before"], result["load_average_after"] = load_before, os.getloadavg()[0]
    for k, level in result["levels"].items():
        print(
            f"median k={k}: {level['median_ratio']:.3f}x unconstrained tokens/s"
            f" ({level['median_cpu_ratio']:.3f}x per CPU-second),"
            f" grammar {level['median_grammar_us_per_token']} us/token"
            f" ({level['median_grammar_share']:.2%} of the decode time)"
        )
    if args.json:
        args.json.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
