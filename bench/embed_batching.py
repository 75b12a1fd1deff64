"""Micro-batching measurement: 64 concurrent single-text embed calls vs one encode() of 64 texts.

Both sides run in this one process on the shipped all-MiniLM-L6-v2, interleaved per repetition
(and alternating which goes first) so background load on a shared machine hits both alike:

- direct:  ``encode(texts)``, one forward pass over all 64 texts (``batch_size=64``);
- batched: 64 ``SentenceEmbedder.embed([text])`` calls awaited concurrently, through the
  `MicroBatcher` (a worker thread, continuous batching, ``max_batch``/``max_batch_tokens`` from
  the flags; ``--threads 0`` lets the embedder's `ThreadTuner` choose torch threads per pass).

It prints texts/s for each and their ratio per repetition, then the median; also the ratio of
process CPU time (all threads; less disturbed by other processes on a shared machine) and the
batcher's own cost per call, timed with a forward pass that does nothing. With ``--sequential``
it also times 64 separate one-text ``encode`` calls (what a per-request endpoint would do).

    .venv/bin/python bench/embed_batching.py --reps 7 [--max-batch-tokens 16384] [--threads N] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch

from bench.corpus import CORPORA
from server.backends.embedding import MINILM, SentenceEmbedder, minilm_path
from server.settings import Settings

SUBJECTS = ("The committee", "A small robot", "My neighbour's dog", "The night train", "Our new database")
VERBS = ("approved", "cleaned", "barked at", "crossed", "indexed")
OBJECTS = (
    "the budget.",
    "the kitchen floor while everyone was asleep.",
    "the postman again this morning, which annoyed the whole street.",
    "the frozen river slowly under a pale winter sky full of low clouds and drifting snow.",
)


def make_texts(n: int) -> list[str]:
    """n distinct sentences of mixed length (about 4 to 25 words), like real short inputs."""
    return [f"{SUBJECTS[i % 5]} {VERBS[(i // 5) % 5]} {OBJECTS[(i * 7) % 4]} (#{i})" for i in range(n)]


async def batched_once(embedder: SentenceEmbedder, texts: list[str]) -> tuple[float, float]:
    """Wall seconds and process CPU seconds (all threads) for n concurrent one-text calls."""
    started, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(embedder.embed([text]) for text in texts))
    return time.perf_counter() - started, time.process_time() - cpu


def direct_once(model: object, texts: list[str]) -> tuple[float, float]:
    """One sentence-transformers ``encode`` of all texts (the raw limit), at torch's current threads."""
    started, cpu = time.perf_counter(), time.process_time()
    model.encode(texts, batch_size=len(texts), show_progress_bar=False)  # type: ignore[attr-defined]
    return time.perf_counter() - started, time.process_time() - cpu


async def overhead_per_call_us(n: int, settings: Settings, rounds: int = 50) -> float:
    """The batcher's own cost per one-text call: the same path with a forward that does nothing."""
    empty = np.zeros((n, 384), dtype=np.float32)
    embedder = SentenceEmbedder("no-op", lambda texts: empty[: len(texts)], 384, settings)
    embedder.start()
    try:
        texts = make_texts(n)
        await asyncio.gather(*(embedder.embed([text]) for text in texts))
        started = time.perf_counter()
        for _ in range(rounds):
            await asyncio.gather(*(embedder.embed([text]) for text in texts))
        return (time.perf_counter() - started) / (rounds * n) * 1e6
    finally:
        await embedder.close()


async def run(args: argparse.Namespace) -> dict[str, object]:
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(args.direct_threads)
    settings = Settings(
        ollama_urls=[],
        embed_max_batch=args.max_batch,
        embed_max_batch_tokens=args.max_batch_tokens,
        torch_threads=args.threads,
    )
    load_started = time.perf_counter()
    embedder = SentenceEmbedder.load(MINILM, minilm_path(), settings)
    load_s = time.perf_counter() - load_started
    model = SentenceTransformer(minilm_path(), device="cpu")
    embedder.start()
    texts = CORPORA[args.corpus](args.n)
    try:
        direct_once(model, texts)  # warm-up: first passes allocate and tune kernels
        await batched_once(embedder, texts)
        rows = []
        for rep in range(args.reps):
            if rep % 2 == 0:
                direct, direct_cpu = direct_once(model, texts)
                batched, batched_cpu = await batched_once(embedder, texts)
            else:
                batched, batched_cpu = await batched_once(embedder, texts)
                direct, direct_cpu = direct_once(model, texts)
            row = {
                "direct_texts_per_s": args.n / direct,
                "batched_texts_per_s": args.n / batched,
                "ratio": direct / batched,
                "cpu_ratio": direct_cpu / batched_cpu,
            }
            rows.append(row)
            print(
                f"rep {rep}: direct {row['direct_texts_per_s']:7.1f} texts/s   "
                f"batched {row['batched_texts_per_s']:7.1f} texts/s   ratio {row['ratio']:.3f}   "
                f"cpu-time ratio {row['cpu_ratio']:.3f}",
                flush=True,
            )
        stats = embedder.batcher.stats
        chosen = dict(embedder.tuner.chosen) if embedder.tuner is not None else {}
        sequential = None
        if args.sequential:
            started = time.perf_counter()
            for text in texts:
                model.encode([text], show_progress_bar=False)
            sequential = args.n / (time.perf_counter() - started)
    finally:
        await embedder.close()
    overhead = await overhead_per_call_us(args.n, settings)
    result: dict[str, object] = {
        "n": args.n,
        "reps": args.reps,
        "corpus": args.corpus,
        "max_batch": args.max_batch,
        "max_batch_tokens": args.max_batch_tokens,
        "server_threads_setting": args.threads,
        "passes_per_thread_count": chosen,
        "direct_torch_threads": args.direct_threads,
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "load_s": round(load_s, 2),
        "median_direct_texts_per_s": round(statistics.median(r["direct_texts_per_s"] for r in rows), 1),
        "median_batched_texts_per_s": round(statistics.median(r["batched_texts_per_s"] for r in rows), 1),
        "median_ratio": round(statistics.median(r["ratio"] for r in rows), 3),
        "min_ratio": round(min(r["ratio"] for r in rows), 3),
        "max_ratio": round(max(r["ratio"] for r in rows), 3),
        "median_cpu_ratio": round(statistics.median(r["cpu_ratio"] for r in rows), 3),
        "batcher_overhead_us_per_call": round(overhead, 1),
        "batches": stats.batches,
        "mean_batch_size": round(stats.items / max(stats.batches, 1), 1),
        "mean_oldest_wait_ms": round(stats.queue_wait_ms_sum / max(stats.batches, 1), 2),
        "mean_padded_tokens": round(stats.padded_tokens_sum / max(stats.batches, 1), 1),
        "sequential_texts_per_s": None if sequential is None else round(sequential, 1),
        "rows": rows,
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--n", type=int, default=64, help="concurrent single-text calls (and direct batch size)"
    )
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--max-batch-tokens", type=int, default=16384)
    parser.add_argument("--corpus", choices=sorted(CORPORA), default="mixed")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="the embedder's torch threads (SLUICE_TORCH_THREADS; 0 = tuned)",
    )
    parser.add_argument("--direct-threads", type=int, default=1, help="torch threads of the direct encode")
    parser.add_argument(
        "--sequential", action="store_true", help="also time n separate one-text encode calls"
    )
    parser.add_argument("--json", type=Path, help="write the result here as JSON")
    args = parser.parse_args()
    result = asyncio.run(run(args))
    summary = {key: value for key, value in result.items() if key != "rows"}
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
