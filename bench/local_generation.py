"""Benchmark 4: local generation (embedded SmolLM2-135M), aggregate tokens/s for 1, 2, 4 requests.

sluice runs with its local model and no Ollama. For each concurrency k, k WebSocket sessions send
one `generate` each at the same moment (greedy, `max_tokens` fixed, prompts of similar length);
aggregate tokens/s is the sum of completion tokens over the wall time from the first send to the
last terminal message. Tokens are the server's `done.usage.completion_tokens` (deltas may merge
several tokens), checked against the delta count. The baseline is k = 1 in the same run.

Run alone: `python -m bench.local_generation [--quick]` prints its JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from bench import servers
from bench.session_clients import WsSession, new_id
from bench.stats import median

__all__ = ["LocalGenConfig", "run"]

GENERATOR = "1 Python asyncio process, one WebSocket session per request (websockets client)"
MODEL = "smollm2:135m"
_TOPICS = ("a lighthouse keeper", "a river pilot", "a mountain baker", "a city gardener")


@dataclass
class LocalGenConfig:
    concurrency: list[int] = field(default_factory=lambda: [1, 2, 4])
    max_tokens: int = 32
    repeats: int = 2
    round_limit_s: float = 90.0  # one round of k requests; slower than this is a failure
    budget_s: float = 150.0  # past this, repeats after the first are skipped

    @classmethod
    def quick(cls) -> LocalGenConfig:
        return cls(concurrency=[1, 2], max_tokens=6, repeats=1, round_limit_s=60.0, budget_s=60.0)


async def _round(url: str, k: int, max_tokens: int, limit_s: float) -> dict[str, Any]:
    sessions = [WsSession(url) for _ in range(k)]
    await asyncio.gather(*(s.open() for s in sessions))
    deltas = [0] * k
    try:
        futures = []
        start = time.perf_counter()
        for i, session in enumerate(sessions):

            def count(_at: float, message: dict[str, Any], i: int = i) -> None:
                deltas[i] += message.get("type") == "delta"

            request = {
                "type": "generate",
                "id": new_id("l"),
                "model": MODEL,
                "prompt": f"Write a long story about {_TOPICS[i % len(_TOPICS)]}.",
                "options": {"max_tokens": max_tokens, "temperature": 0.0},
            }
            futures.append(await session.submit(request, count))
        terminals = await asyncio.wait_for(asyncio.gather(*futures), limit_s)
        wall = time.perf_counter() - start
    finally:
        await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)
    tokens = [int((t.get("usage") or {}).get("completion_tokens") or 0) for t in terminals]
    errors = [str(t.get("code")) for t in terminals if t.get("type") != "done"]
    return {
        "wall_s": wall,
        "tokens": tokens,
        "deltas": deltas,
        "finish": [t.get("finish_reason") for t in terminals],
        "errors": errors,
        "tokens_per_s": sum(tokens) / wall,
    }


def run(config: LocalGenConfig) -> dict[str, Any]:
    unavailable: dict[str, str] = {}
    targets: dict[str, Any] = {}
    out: dict[str, Any] = {"generator": GENERATOR, "model": MODEL, "max_tokens": config.max_tokens}
    out |= {"targets": targets, "unavailable": unavailable}
    reason = servers.sluice_unavailable()
    if reason is not None:
        unavailable["sluice"] = reason
        return out
    try:
        with servers.sluice(local_generation=True, label="local_generation") as sluice:

            async def main() -> dict[str, Any]:
                await _round(sluice.ws_url, 1, 4, config.round_limit_s)  # warm-up: first passes allocate
                runs: dict[int, list[dict[str, Any]]] = {k: [] for k in config.concurrency}
                deadline = time.monotonic() + config.budget_s
                for repeat in range(config.repeats):
                    if repeat and time.monotonic() > deadline:
                        out["skipped_repeats"] = config.repeats - repeat
                        break
                    for k in config.concurrency:  # interleaved, so drift in load hits every k alike
                        try:
                            runs[k].append(
                                await _round(sluice.ws_url, k, config.max_tokens, config.round_limit_s)
                            )
                        except (TimeoutError, ConnectionError, OSError) as exc:
                            runs[k].append({"error": f"{type(exc).__name__}: {exc}"[:300]})
                by_k: dict[str, Any] = {}
                for k, done in runs.items():
                    rates = [r["tokens_per_s"] for r in done if "tokens_per_s" in r]
                    by_k[str(k)] = {"tokens_per_s": median(rates), "runs": done}
                return by_k

            targets["sluice"] = asyncio.run(main())
    except Exception as exc:  # one broken target must not end the whole run
        unavailable["sluice"] = f"{type(exc).__name__}: {exc}"[:800]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    result = run(LocalGenConfig.quick() if args.quick else LocalGenConfig())
    sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
