"""Run every benchmark, print the table, write JSON results and PNG plots (`make bench`).

    .venv/bin/python bench/run.py            # full run (< 15 min on the 2-core machine)
    .venv/bin/python bench/run.py --quick    # smoke run: seconds, small counts, no infinity, no 10k, no workers
    .venv/bin/python bench/run.py --only relay ttft --out /tmp/x

Full runs write `bench/results/<date>.json`, `bench/results/latest.json` and the plots next to
them; quick runs write under `bench/results/tmp/` (ignored by git) unless `--out` says otherwise.
Each benchmark starts and stops its own servers on loopback; one that fails is recorded with its
error and the run goes on. The numbers are whatever this machine measured: nothing is adjusted.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import orjson

from bench import (
    cluster_cost,
    embeddings,
    idle_sessions,
    local_constrained,
    local_generation,
    relay,
    report,
    servers,
    sse_vs_ws,
    ttft,
    workers,
)
from bench.procs import REPO, raise_nofile, set_log_dir

__all__ = ["BENCHMARKS", "main"]

# name -> (run, full config factory, quick config factory); run in this order.
BENCHMARKS: dict[str, tuple[Callable[[Any], dict[str, Any]], Callable[[], Any], Callable[[], Any]]] = {
    "embeddings": (embeddings.run, embeddings.EmbedConfig, embeddings.EmbedConfig.quick),
    "relay": (relay.run, relay.RelayConfig, relay.RelayConfig.quick),
    "ttft": (ttft.run, ttft.TtftConfig, ttft.TtftConfig.quick),
    "local_generation": (
        local_generation.run,
        local_generation.LocalGenConfig,
        local_generation.LocalGenConfig.quick,
    ),
    "local_constrained": (
        local_constrained.run,
        local_constrained.ConstrainedConfig,
        local_constrained.ConstrainedConfig.quick,
    ),
    "idle_sessions": (idle_sessions.run, idle_sessions.IdleConfig, idle_sessions.IdleConfig.quick),
    "sse_vs_ws": (sse_vs_ws.run, sse_vs_ws.SseWsConfig, sse_vs_ws.SseWsConfig.quick),
    # Cluster mode (a real redis-server; `make bench` installs it when missing).
    "cluster_cost": (cluster_cost.run, cluster_cost.ClusterCostConfig, cluster_cost.ClusterCostConfig.quick),
    "workers": (workers.run, workers.WorkersConfig, workers.WorkersConfig.quick),
}
# Left out of --quick unless named in --only: each starts several servers (minutes, not seconds).
NOT_QUICK = {"workers"}


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    except OSError:
        mem_kb = 0
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False
    )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "sentence_transformers": _version("sentence-transformers"),
        "uvicorn": _version("uvicorn"),
        "websockets": _version("websockets"),
        "sluice": _version("sluice"),
        "commit": commit.stdout.strip() or "unknown",
        "load_average_at_start": list(os.getloadavg()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: seconds, small counts")
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), help="run only these benchmarks")
    parser.add_argument(
        "--out", type=Path, help="results folder (default bench/results, or bench/results/tmp with --quick)"
    )
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="record every sluice server with py-spy (flame graphs in <out>/profiles)",
    )
    args = parser.parse_args(argv)
    for key, value in (
        ("HF_HUB_OFFLINE", "1"),
        ("TRANSFORMERS_OFFLINE", "1"),
        ("TOKENIZERS_PARALLELISM", "false"),
    ):
        os.environ.setdefault(key, value)
    nofile = raise_nofile()
    out_dir = args.out or (REPO / "bench" / "results" / ("tmp" if args.quick else ""))
    out_dir.mkdir(parents=True, exist_ok=True)
    set_log_dir(args.out / "logs" if args.out else REPO / "bench" / "results" / "tmp" / "logs")
    if args.profile:
        # Profiling costs the server CPU: such a run shows where time goes, not how fast it is.
        servers.profile_into(out_dir / "profiles")
    started = dt.datetime.now().astimezone()
    document: dict[str, Any] = {
        "schema": 1,
        "mode": "quick" if args.quick else "full",
        "started": started.isoformat(timespec="seconds"),
        "profiled": args.profile,
        "machine": machine() | {"rlimit_nofile": nofile},
        "results": {},
        "seconds": {},
    }
    begin = time.monotonic()
    for name, (run, full, quick) in BENCHMARKS.items():
        if args.only and name not in args.only:
            continue
        if args.quick and not args.only and name in NOT_QUICK:
            continue
        print(f"[bench] {name} ...", flush=True)
        t0 = time.monotonic()
        try:
            document["results"][name] = run(quick() if args.quick else full())
        except Exception as exc:  # record it; the other benchmarks still run
            document["results"][name] = {"error": f"{type(exc).__name__}: {exc}"[:1000]}
        document["seconds"][name] = round(time.monotonic() - t0, 1)
        print(f"[bench] {name} done in {document['seconds'][name]} s", flush=True)
    document["seconds"]["total"] = round(time.monotonic() - begin, 1)
    document["machine"]["load_average_at_end"] = list(os.getloadavg())
    figs = report.figures(document["results"])
    checks = report.targets(document["results"])
    document["figures"] = [f.as_dict() for f in figs]
    document["targets"] = [c.as_dict() for c in checks]

    stamp = started.strftime("%Y-%m-%d-%H%M%S")
    prefix = "quick-" if args.quick else ""
    paths = [out_dir / f"{prefix}{stamp}.json", out_dir / f"{prefix}latest.json"]
    if not args.no_plots:
        from bench import plots  # matplotlib only when plotting

        title = f"{document['machine']['cores']} cores, {stamp}{' (quick)' if args.quick else ''}"
        document["plots"] = [
            str(p.relative_to(out_dir)) for p in plots.render(document["results"], out_dir, title)
        ]
    encoded = orjson.dumps(document, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY)
    for path in paths:
        path.write_bytes(encoded)
    # orjson writes NaN as null; the Markdown is rendered from the same decoded document.
    (out_dir / f"{prefix}latest.md").write_text(report.markdown(orjson.loads(encoded)))

    print()
    print(
        f"sluice benchmarks — {document['mode']} run, {document['started']}, {document['machine']['cpu']}, "
        f"{document['machine']['cores']} cores, load avg at start {document['machine']['load_average_at_start'][0]:.2f}"
    )
    print(report.table(figs, checks))
    print()
    generators = {
        name: section.get("generator")
        for name, section in document["results"].items()
        if isinstance(section, dict)
    }
    for name, generator in generators.items():
        if generator:
            print(f"  load generator, {name}: {generator}")
    print(f"\n  wrote {paths[0]}, {prefix}latest.md and the plots ({document['seconds']['total']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
