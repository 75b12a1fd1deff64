"""PNG plots of a benchmark run: latency and throughput against concurrency (matplotlib, Agg).

`render(results, directory)` writes whichever plots the results have data for and returns their
paths. It only draws what was measured; it never fills gaps.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

__all__ = ["render"]

_STYLE = {
    "sluice-ws": ("tab:blue", "o"),
    "sluice-http": ("tab:cyan", "s"),
    "sluice": ("tab:blue", "o"),
    "infinity": ("tab:green", "^"),
    "seed": ("tab:red", "v"),
    "direct": ("tab:gray", "x"),
    "raw": ("black", "D"),
}


def _series(rows: dict[str, Any], key: str) -> tuple[list[int], list[float]]:
    points = sorted((int(level), row.get(key)) for level, row in rows.items())
    kept = [(x, float(y)) for x, y in points if isinstance(y, int | float) and not math.isnan(y)]
    return [x for x, _ in kept], [y for _, y in kept]


def _ticks(ax: Any, levels: set[int]) -> None:
    """Label the x axis with the measured levels themselves (1, 8, 64), not powers of ten."""
    if levels:
        ax.set_xticks(sorted(levels))
        ax.set_xticklabels([str(level) for level in sorted(levels)])
        ax.minorticks_off()


def _embeddings(section: dict[str, Any], directory: Path, title: str) -> list[Path]:
    targets = section.get("targets") or {}
    if not any(name != "raw" for name in targets):
        return []
    paths = []
    levels: set[int] = set()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, rows in targets.items():
        color, marker = _STYLE.get(name, ("tab:purple", "."))
        key = "texts_per_s" if name == "raw" else "throughput_per_s"
        xs, ys = _series(rows, key)
        if not xs:
            continue
        levels.update(xs)
        label = "raw encode() of N texts (limit)" if name == "raw" else name
        ax.plot(xs, ys, marker=marker, color=color, label=label, linestyle="--" if name == "raw" else "-")
    ax.set(
        xscale="log",
        xlabel="concurrent clients (one text per request)",
        ylabel="texts / s",
        title=f"Embeddings throughput — {title}",
    )
    ax.grid(True, alpha=0.3)
    ax.legend()
    _ticks(ax, levels)
    paths.append(directory / "embeddings_throughput.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, rows in targets.items():
        if name == "raw":
            continue
        color, marker = _STYLE.get(name, ("tab:purple", "."))
        for key, style in (("p50_ms", "-"), ("p99_ms", ":")):
            xs, ys = _series(rows, key)
            if xs:
                ax.plot(xs, ys, marker=marker, color=color, linestyle=style, label=f"{name} {key[:3]}")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="concurrent clients",
        ylabel="latency (ms)",
        title=f"Embeddings latency — {title}",
    )
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    _ticks(ax, levels)
    paths.append(directory / "embeddings_latency.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def _relay(section: dict[str, Any], directory: Path, title: str) -> list[Path]:
    targets = section.get("targets") or {}
    if not targets:
        return []
    fig, (cpu_ax, gap_ax) = plt.subplots(1, 2, figsize=(11, 4.5))
    for name, rows in targets.items():
        color, marker = _STYLE.get(name, ("tab:purple", "."))
        if name != "direct":
            cpu_ax.plot(*_series(rows, "cpu_s_per_1k_tokens"), marker=marker, color=color, label=name)
        gap_ax.plot(*_series(rows, "added_gap_p99_ms"), marker=marker, color=color, label=name)
    rate = section.get("token_rate")
    cpu_ax.set(xlabel="concurrent streams", ylabel="server CPU s / 1,000 tokens", title="Relay CPU per token")
    gap_ax.axhline(20.0, color="tab:orange", linestyle="--", label="target 20 ms")
    gap_ax.set(
        xlabel="concurrent streams",
        ylabel="p99 added inter-token delay (ms)",
        title=f"Relay delay ({rate} tok/s per stream)",
    )
    streams = {int(level) for rows in targets.values() for level in rows}
    for ax in (cpu_ax, gap_ax):
        ax.grid(True, alpha=0.3)
        ax.legend()
        _ticks(ax, streams)
    fig.suptitle(title)
    path = directory / "relay.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def _local(section: dict[str, Any], directory: Path, title: str) -> list[Path]:
    rows = (section.get("targets") or {}).get("sluice") or {}
    xs, ys = _series(rows, "tokens_per_s")
    if not xs:
        return []
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.plot(xs, ys, marker="o", color="tab:blue", label="sluice aggregate")
    if 1 in xs:
        one = ys[xs.index(1)]
        ax.plot(xs, [one * x for x in xs], linestyle=":", color="gray", label="linear in concurrency")
        ax.plot(
            xs,
            [one * 2.4 if x == 4 else math.nan for x in xs],
            marker="*",
            color="tab:orange",
            linestyle="",
            label="target at 4 (2.4x)",
        )
    ax.set(xlabel="concurrent requests", ylabel="aggregate tokens / s", title=f"Local generation — {title}")
    ax.grid(True, alpha=0.3)
    ax.legend()
    _ticks(ax, set(xs))
    path = directory / "local_generation.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def render(results: dict[str, Any], directory: Path, title: str) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    paths += _embeddings(results.get("embeddings") or {}, directory, title)
    paths += _relay(results.get("relay") or {}, directory, title)
    paths += _local(results.get("local_generation") or {}, directory, title)
    return paths
