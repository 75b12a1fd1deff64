"""Turn the benchmarks' raw results into figures, DESIGN.md targets (met / not met) and a table.

`figures(results)` lists every figure with its baseline from the same run and the ratio;
`targets(results)` checks each DESIGN.md "How good it must be" row; `table(...)` renders both as
text. Nothing here measures or adjusts a number: a figure that was not measured says why.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from bench.stats import ratio

__all__ = ["Figure", "TargetCheck", "figures", "markdown", "table", "targets"]

Results = dict[str, Any]


@dataclass
class Figure:
    benchmark: str
    name: str
    value: float | None
    unit: str
    baseline: str | None = None
    baseline_value: float | None = None
    ratio: float | None = None
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TargetCheck:
    what: str
    target: str
    value: float | None
    baseline_value: float | None
    measured: str  # the number compared with the target, as text
    status: str  # "met" | "not met" | "not measured"
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _num(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value):
        return float(value)
    return None


def _get(tree: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _why_missing(results: Results, bench: str, *targets: str) -> str:
    section = results.get(bench)
    if section is None:
        return f"{bench} not run"
    if "error" in section:
        return f"{bench} failed: {section['error']}"[:300]
    unavailable = section.get("unavailable") or {}
    for target in targets:
        if target in unavailable:
            return f"{target}: {unavailable[target]}"[:300]
    return "level not measured in this run"


def figures(results: Results) -> list[Figure]:
    from bench import embed_report  # it imports this module's types

    out: list[Figure] = embed_report.figures(results)

    relay = _get(results, "relay", "targets") or {}
    for name in ("sluice", "sluice-http", "seed", "direct"):
        for level, row in (relay.get(name) or {}).items():
            seed_cpu = _num(_get(relay, "seed", level, "cpu_s_per_1k_tokens"))
            cpu = _num(row.get("cpu_s_per_1k_tokens"))
            if name != "direct":
                out.append(
                    Figure(
                        "relay",
                        f"{name} CPU s/1k tokens @{level} streams",
                        cpu,
                        "s",
                        "seed relay",
                        seed_cpu,
                        ratio(cpu, seed_cpu),
                    )
                )
            direct_gap = _num(_get(relay, "direct", level, "added_gap_p99_ms"))
            gap = _num(row.get("added_gap_p99_ms"))
            note = (
                f"steady state; with ramp p99 {row.get('all_added_gap_p99_ms', math.nan):.1f} ms; "
                f"lost {row.get('tokens_lost')}, errors {row.get('stream_errors')}, "
                f"ttft p50 {row.get('ttft_p50_ms', math.nan):.1f} ms"
            )
            out.append(
                Figure(
                    "relay",
                    f"{name} p99 added gap @{level} streams",
                    gap,
                    "ms",
                    "direct read",
                    direct_gap,
                    ratio(gap, direct_gap),
                    note,
                )
            )

    ttft = _get(results, "ttft", "targets") or {}
    direct = _num(_get(ttft, "direct", "ttft_p50_ms"))
    for name, row in ttft.items():
        value = _num(row.get("ttft_p50_ms"))
        note = f"added {row.get('added_p50_ms', math.nan):.2f} ms"
        out.append(
            Figure("ttft", f"{name} TTFT p50", value, "ms", "direct read", direct, ratio(value, direct), note)
        )

    local = _get(results, "local_generation", "targets", "sluice") or {}
    one = _num(_get(local, "1", "tokens_per_s"))
    for level, row in local.items():
        value = _num(row.get("tokens_per_s"))
        out.append(
            Figure(
                "local_generation",
                f"aggregate tok/s @{level}",
                value,
                "tok/s",
                "1 request",
                one,
                ratio(value, one),
            )
        )

    for level, row in (_get(results, "idle_sessions", "levels") or {}).items():
        value = _num(row.get("rss_per_session_bytes"))
        out.append(
            Figure(
                "idle_sessions",
                f"RSS per session @{level}",
                value / 1024 if value is not None else None,
                "KB",
                note=f"{row.get('sessions')} open",
            )
        )

    sse = _get(results, "sse_vs_ws", "targets") or {}
    ws = _num(_get(sse, "ws", "tokens_per_s"))
    for name in ("sse", "ws", "ws_websockets", "direct"):
        value = _num(_get(sse, name, "tokens_per_s"))
        if name in sse:
            out.append(
                Figure("sse_vs_ws", f"{name} one-stream tok/s", value, "tok/s", "ws", ws, ratio(value, ws))
            )
    ws_cpu = _num(_get(sse, "ws", "server_us_per_token"))
    for name in ("sse", "ws", "ws_websockets"):
        value = _num(_get(sse, name, "server_us_per_token"))
        if value is not None:
            per_delta = _num(_get(sse, name, "server_us_per_delta")) or 0.0
            note = f"{per_delta:.2f} µs per delta, {_num(_get(sse, name, 'deltas')) or 0:,.0f} deltas"
            name_cpu = f"{name} server CPU/token"
            out.append(Figure("sse_vs_ws", name_cpu, value, "µs", "ws", ws_cpu, ratio(value, ws_cpu), note))
    return out


def _check(
    what: str,
    target: str,
    value: float | None,
    baseline: float | None,
    *,
    compare: Callable[[float], bool],
    show: Callable[[float], str],
    missing: str,
) -> TargetCheck:
    if value is None:
        return TargetCheck(what, target, None, baseline, "—", "not measured", missing)
    return TargetCheck(what, target, value, baseline, show(value), "met" if compare(value) else "not met")


def targets(results: Results) -> list[TargetCheck]:
    from bench import embed_report  # it imports this module's types

    checks = embed_report.targets(results)
    relay = _get(results, "relay", "targets") or {}
    # Issue 13's targets, for both of sluice's streams: the WebSocket ("sluice") and the seed HTTP
    # stream ("sluice-http"), each at 100 and at 500 streams (DESIGN.md's rows are the 500 ones).
    for kind, label in (("sluice", ""), ("sluice-http", ", seed HTTP stream")):
        why = _why_missing(results, "relay", kind, "seed")
        for streams, gap_bound in (("100", 3.0), ("500", 20.0)):
            cpu = _num(_get(relay, kind, streams, "cpu_s_per_1k_tokens"))
            seed_cpu = _num(_get(relay, "seed", streams, "cpu_s_per_1k_tokens"))
            checks.append(
                _check(
                    f"relay {streams} streams{label}: server CPU per token vs seed relay",
                    "≤ 0.35x",
                    ratio(cpu, seed_cpu),
                    seed_cpu,
                    compare=lambda r: r <= 0.35,
                    show=lambda r: f"{r:.2f}x",
                    missing=why,
                )
            )
            checks.append(
                _check(
                    f"relay {streams} streams{label}: p99 added inter-token delay (steady state)",
                    f"≤ {gap_bound:.0f} ms",
                    _num(_get(relay, kind, streams, "added_gap_p99_ms")),
                    _num(_get(relay, "direct", streams, "added_gap_p99_ms")),
                    compare=lambda v, bound=gap_bound: v <= bound,
                    show=lambda v: f"{v:.1f} ms",
                    missing=why,
                )
            )
            lost = _get(relay, kind, streams)
            lost_value = None if lost is None else float(lost["tokens_lost"] + lost["tokens_extra"])
            checks.append(
                _check(
                    f"relay {streams} streams{label}: tokens lost (or duplicated)",
                    "0",
                    lost_value,
                    None,
                    compare=lambda v: v == 0,
                    show=lambda v: f"{v:.0f}",
                    missing=why,
                )
            )
    local = _get(results, "local_generation", "targets", "sluice") or {}
    four = ratio(_num(_get(local, "4", "tokens_per_s")), _num(_get(local, "1", "tokens_per_s")))
    checks.append(
        _check(
            "local generation, 4 concurrent vs 1 alone",
            "≥ 2.4x",
            four,
            _num(_get(local, "1", "tokens_per_s")),
            compare=lambda r: r >= 2.4,
            show=lambda r: f"{r:.2f}x",
            missing=_why_missing(results, "local_generation", "sluice"),
        )
    )
    level = _get(results, "idle_sessions", "levels", "10000") or {}
    per = _num(level.get("rss_per_session_bytes"))
    full = level.get("sessions") == 10000
    checks.append(
        _check(
            "idle sessions: RSS per WS session at 10,000",
            "≤ 40 KB",
            per / 1024 if per is not None else None,
            None,
            compare=lambda kb: kb <= 40.0 and full,
            show=lambda kb: f"{kb:.1f} KB ({level.get('sessions')} open)",
            missing=_why_missing(results, "idle_sessions", "sluice"),
        )
    )
    sse = _get(results, "sse_vs_ws", "targets") or {}
    ws = _num(_get(sse, "ws", "tokens_per_s"))
    checks.append(
        _check(
            "SSE vs WS throughput, one stream",
            "≥ 0.6x",
            ratio(_num(_get(sse, "sse", "tokens_per_s")), ws),
            ws,
            compare=lambda r: r >= 0.6,
            show=lambda r: f"{r:.2f}x",
            missing=_why_missing(results, "sse_vs_ws", "sse", "ws"),
        )
    )
    checks.append(
        _check(
            "WS vs SSE throughput, one stream (issue 13)",
            "≥ 1x",
            ratio(ws, _num(_get(sse, "sse", "tokens_per_s"))),
            _num(_get(sse, "sse", "tokens_per_s")),
            compare=lambda r: r >= 1.0,
            show=lambda r: f"{r:.2f}x",
            missing=_why_missing(results, "sse_vs_ws", "ws", "sse"),
        )
    )
    ttft = _get(results, "ttft", "targets") or {}
    checks.append(
        _check(
            "TTFT added by the server (median, over direct)",
            "≤ 1 ms",
            _num(_get(ttft, "sluice", "added_p50_ms")),
            _num(_get(ttft, "direct", "ttft_p50_ms")),
            compare=lambda v: v <= 1.0,
            show=lambda v: f"{v:.2f} ms",
            missing=_why_missing(results, "ttft", "sluice"),
        )
    )
    return checks


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "—"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def table(figs: list[Figure], checks: list[TargetCheck]) -> str:
    lines = ["Targets (DESIGN.md, How good it must be)", ""]
    width = max(len(c.what) for c in checks) if checks else 10
    for check in checks:
        status = check.status.upper() if check.status != "met" else "met"
        detail = f"  [{check.reason}]" if check.reason else ""
        lines.append(
            f"  {check.what:<{width}}  target {check.target:<8} measured {check.measured:<22} {status}{detail}"
        )
    lines += ["", "Figures (median of repeats; ratio = figure / baseline from the same run)", ""]
    head = f"  {'benchmark':<17}{'figure':<40}{'median':>12} {'unit':<8}{'baseline':<20}{'base value':>12}{'ratio':>9}  note"
    lines.append(head)
    lines.append("  " + "-" * (len(head) + 20))
    for fig in figs:
        lines.append(
            f"  {fig.benchmark:<17}{fig.name:<40}{_fmt(fig.value):>12} {fig.unit:<8}{fig.baseline or '':<20}"
            f"{_fmt(fig.baseline_value):>12}{(_fmt(fig.ratio) + 'x') if fig.ratio is not None else '—':>9}  {fig.note}"
        )
    return "\n".join(lines)


def markdown(document: dict[str, Any]) -> str:
    """The run as Markdown (targets, then every figure), ready to paste into the README."""
    machine = document["machine"]
    lines = [
        f"Benchmarks, {document['mode']} run of {document['started']} (commit {machine['commit']}): "
        f"{machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB, Linux {machine['kernel']}, "
        f"Python {machine['python']}, torch {machine['torch']}; load average at start "
        f"{machine['load_average_at_start'][0]:.2f} (the machine is shared). Total {document['seconds']['total']} s.",
        "",
        "| target (DESIGN.md) | required | measured | verdict |",
        "|---|---|---|---|",
    ]
    for check in document["targets"]:
        verdict = check["status"] + (f" ({check['reason']})" if check["reason"] else "")
        lines.append(f"| {check['what']} | {check['target']} | {check['measured']} | {verdict} |")
    lines += [
        "",
        "| benchmark | figure | median | baseline (same run) | ratio | note |",
        "|---|---|---|---|---|---|",
    ]
    for fig in document["figures"]:
        base = f"{fig['baseline']}: {_fmt(fig['baseline_value'])}" if fig["baseline"] else ""
        ratio_text = f"{_fmt(fig['ratio'])}x" if fig["ratio"] is not None else ""
        lines.append(
            f"| {fig['benchmark']} | {fig['name']} | {_fmt(fig['value'])} {fig['unit']} | {base} | {ratio_text} | {fig['note']} |"
        )
    lines.append("")
    for name, section in document["results"].items():
        if isinstance(section, dict) and section.get("generator"):
            lines.append(f"- load generator, {name}: {section['generator']}")
    return "\n".join(lines) + "\n"
