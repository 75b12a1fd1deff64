"""The embeddings benchmark's figures and DESIGN.md target checks, for `bench.report`.

Reads what `bench.embeddings.run` wrote: the mixed corpus under ``targets``, the short one under
``short.targets``, each target as ``{level: row}`` and ``raw`` as the limit per size. Every ratio
is against a baseline from the same run; nothing here measures or adjusts a number. `bench.report`
imports this module inside its functions (this one imports `bench.report` for its types).
"""

from __future__ import annotations

import math
from typing import Any

from bench.report import Figure, TargetCheck, _check, _get, _num, _why_missing
from bench.stats import ratio

__all__ = ["figures", "targets"]

Results = dict[str, Any]
CORPUS_LABEL = {"mixed": "", "short": ", short sentences"}


def _corpus(results: Results, corpus: str) -> dict[str, Any]:
    path = ("embeddings", "targets") if corpus == "mixed" else ("embeddings", corpus, "targets")
    found = _get(results, *path)
    return found if isinstance(found, dict) else {}


def figures(results: Results) -> list[Figure]:
    out: list[Figure] = []
    for corpus in CORPUS_LABEL:
        emb = _corpus(results, corpus)
        raw = emb.get("raw") or {}
        suffix = f" ({corpus})" if corpus != "mixed" else ""
        for name in ("sluice-ws", "sluice-http", "infinity", "seed"):
            for level, row in (emb.get(name) or {}).items():
                limit = _num(_get(raw, level, "texts_per_s"))
                value = _num(row.get("throughput_per_s"))
                note = f"p50 {row.get('p50_ms', math.nan):.1f} ms, p99 {row.get('p99_ms', math.nan):.1f} ms"
                note += f", errors {row.get('errors', 0)}"
                out.append(
                    Figure(
                        "embeddings",
                        f"{name} texts/s @{level}{suffix}",
                        value,
                        "texts/s",
                        f"raw encode({level})",
                        limit,
                        ratio(value, limit),
                        note,
                    )
                )
                cpu = _num(row.get("server_cpu_ms_per_text"))
                raw_cpu = _num(_get(raw, level, "cpu_ms_per_text"))
                if cpu is not None:
                    out.append(
                        Figure(
                            "embeddings",
                            f"{name} server CPU/text @{level}{suffix}",
                            cpu,
                            "ms",
                            f"raw encode({level}) CPU",
                            raw_cpu,
                            ratio(cpu, raw_cpu),
                        )
                    )
        for level, row in raw.items():
            threads = row.get("best_threads")
            note = f"fastest torch threads per sample {threads}; alone {row.get('alone_texts_per_s', math.nan):.1f}"
            out.append(
                Figure(
                    "embeddings",
                    f"raw encode texts/s @{level}{suffix}",
                    _num(row.get("texts_per_s")),
                    "texts/s",
                    note=note + f"; {row.get('latency_ms', math.nan):.1f} ms per call"
                    f", CPU {row.get('cpu_ms_per_text', math.nan):.2f} ms/text",
                )
            )
    return out


def targets(results: Results) -> list[TargetCheck]:
    checks = []
    why = _why_missing(results, "embeddings", "sluice-ws", "raw", "seed")
    for corpus, label in CORPUS_LABEL.items():
        emb = _corpus(results, corpus)
        for level, least in (("64", 0.9), ("8", 0.8)):
            ws = _num(_get(emb, "sluice-ws", level, "throughput_per_s"))
            raw = _num(_get(emb, "raw", level, "texts_per_s"))
            checks.append(
                _check(
                    f"embeddings, {level} WS clients vs one encode() of {level}{label}",
                    f"≥ {least}x",
                    ratio(ws, raw),
                    raw,
                    compare=lambda r, least=least: r >= least,
                    show=lambda r: f"{r:.2f}x",
                    missing=why,
                )
            )
        cpu = _num(_get(emb, "sluice-ws", "64", "server_cpu_ms_per_text"))
        raw_cpu = _num(_get(emb, "raw", "64", "cpu_ms_per_text"))
        checks.append(
            _check(
                f"embeddings, server CPU per text at 64 WS clients vs raw encode's{label}",
                "≤ 1.2x",
                ratio(cpu, raw_cpu),
                raw_cpu,
                compare=lambda r: r <= 1.2,
                show=lambda r: f"{r:.2f}x",
                missing=why,
            )
        )
    emb = _corpus(results, "mixed")
    p50 = _num(_get(emb, "sluice-ws", "1", "p50_ms"))
    raw_one = _num(_get(emb, "raw", "1", "latency_ms"))
    checks.append(
        _check(
            "embeddings, one WS client: p50 latency over raw encode of one text",
            "≤ +2 ms",
            None if p50 is None or raw_one is None else p50 - raw_one,
            raw_one,
            compare=lambda added: added <= 2.0,
            show=lambda added: f"{added:+.1f} ms",
            missing=why,
        )
    )
    seed_p50 = _num(_get(emb, "seed", "1", "p50_ms"))
    checks.append(
        _check(
            "embeddings, one WS client: p50 latency vs seed endpoint's",
            "< 1x",
            ratio(p50, seed_p50),
            seed_p50,
            compare=lambda r: r < 1.0,
            show=lambda r: f"{r:.2f}x",
            missing=why,
        )
    )
    ws64 = _num(_get(emb, "sluice-ws", "64", "throughput_per_s"))
    seed64 = _num(_get(emb, "seed", "64", "throughput_per_s"))
    checks.append(
        _check(
            "embeddings, 64 WS clients vs seed endpoint",
            "≥ 3.5x",
            ratio(ws64, seed64),
            seed64,
            compare=lambda r: r >= 3.5,
            show=lambda r: f"{r:.2f}x",
            missing=why,
        )
    )
    ahead = [
        ratio(
            _num(_get(emb, "sluice-ws", level, "throughput_per_s")),
            _num(_get(emb, "infinity", level, "throughput_per_s")),
        )
        for level in ("1", "8", "64")
    ]
    worst = None if any(r is None for r in ahead) else min(r for r in ahead if r is not None)
    checks.append(
        _check(
            "embeddings, WS vs infinity-emb at 1, 8 and 64 clients (the lowest ratio)",
            "> 1x",
            worst,
            None,
            compare=lambda r: r > 1.0,
            show=lambda r: f"{r:.2f}x",
            missing=_why_missing(results, "embeddings", "infinity", "sluice-ws"),
        )
    )
    return checks
