"""Benchmark 1: embeddings with 1, 8 and 64 concurrent clients, one text per request, two corpora.

Targets: sluice over WebSocket (`embed`) and over its seed-compatible HTTP endpoint, the seed-style
service, infinity-emb (its OpenAI-style `/embeddings`), and the raw limit: one in-process
`encode()` of as many texts as there are clients, at its fastest torch thread count. Each client
keeps exactly one request in flight on its own connection. After a warm-up, the run is cut into
equal windows; throughput and p50/p99 latency are computed per window and their medians reported,
with the server process's CPU time per embedded text over the windows (psutil) next to raw
encode's process CPU time per text. The load generator is one asyncio process (websockets client,
`bench.rawhttp` keep-alive HTTP client); its CPU share is recorded.

The raw limit is measured alone first, then again between targets, always while no server process
is alive, on both corpora (`bench.corpus`: ``mixed`` and ``short``); its median is the limit. The
mixed corpus keeps the top-level ``targets`` layout; the short one is under ``short.targets``.

Run alone: `python -m bench.embeddings [--quick]` prints its JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import select
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from bench import procs, servers
from bench.baselines import infinity as infinity_venv
from bench.corpus import CORPORA
from bench.procs import VENV_BIN, ProcessFailed, base_env
from bench.rawhttp import HttpConnection
from bench.session_clients import WsSession, new_id
from bench.stats import CpuMeter, median, percentile

__all__ = ["EmbedConfig", "run"]

GENERATOR = "1 Python asyncio process: websockets client (WS), bench.rawhttp keep-alive client (HTTP)"
Call = Callable[[str], Awaitable[str | None]]  # None when the request succeeded, else why not


@dataclass
class EmbedConfig:
    concurrency: list[int] = field(default_factory=lambda: [1, 8, 64])
    corpora: list[str] = field(default_factory=lambda: ["mixed", "short"])
    warmup_s: float = 1.0
    window_s: float = 2.0
    windows: int = 3
    raw_repeats: int = 5
    infinity: bool = True
    http_corpora: list[str] | None = None  # sluice's HTTP endpoint: these corpora only (None: all)

    @classmethod
    def quick(cls) -> EmbedConfig:
        return cls(
            concurrency=[1, 64],
            warmup_s=0.5,
            window_s=2.0,
            windows=1,
            raw_repeats=2,
            infinity=False,
            http_corpora=["mixed"],
        )


class _Client:
    """One benchmark client: a connection plus a `call(text) -> error or None` for the target's API."""

    def __init__(self, call: Call, close: Callable[[], Awaitable[None]]) -> None:
        self.call = call
        self.close = close


async def _ws_client(server: servers.Server) -> _Client:
    session = WsSession(server.ws_url)
    await session.open()

    async def call(text: str) -> str | None:
        future = await session.submit({"type": "embed", "id": new_id("e"), "input": text})
        reply = await future
        return None if reply.get("type") == "embedding" else f"{reply.get('type')} {reply.get('code')}"

    return _Client(call, session.close)


def _http_client(port: int, path: str, body: Callable[[str], object]) -> Callable[[], Awaitable[_Client]]:
    async def make() -> _Client:
        connection = HttpConnection(port)

        async def call(text: str) -> str | None:
            response = await connection.request("POST", path, body(text))
            return None if response.status == 200 else f"HTTP {response.status} {response.body[:120]!r}"

        return _Client(call, connection.close)

    return make


def _seed_body(text: str) -> object:
    return {"texts": [text]}


def _infinity_body(text: str) -> object:
    return {"input": [text], "model": servers.EMBED_MODEL}


async def _drive(
    make: Callable[[], Awaitable[_Client]],
    concurrency: int,
    config: EmbedConfig,
    texts: list[str],
    server: servers.Server | None,
) -> dict[str, Any]:
    clients = await asyncio.gather(*(make() for _ in range(concurrency)))
    done: list[tuple[float, float, bool]] = []  # (finished at, latency s, ok)
    start = time.perf_counter()
    measured_from = start + config.warmup_s
    stop_at = measured_from + config.window_s * config.windows
    server_cpu: list[float] = []  # the server's CPU seconds at the start and the end of the windows

    async def loop(index: int, client: _Client) -> None:
        sent = index
        while time.perf_counter() < stop_at:
            began = time.perf_counter()
            try:
                ok = await client.call(texts[sent % len(texts)]) is None
            except (ConnectionError, OSError, asyncio.IncompleteReadError):
                ok = False
            ended = time.perf_counter()
            done.append((ended, ended - began, ok))
            sent += concurrency

    async def sample_server_cpu() -> None:
        if server is None:
            return
        for at in (measured_from, stop_at):
            await asyncio.sleep(max(0.0, at - time.perf_counter()))
            server_cpu.append(await asyncio.to_thread(server.proc.cpu_seconds))

    cpu = CpuMeter()
    cpu.start()
    try:
        await asyncio.wait_for(
            asyncio.gather(sample_server_cpu(), *(loop(i, c) for i, c in enumerate(clients))),
            stop_at - start + 60.0,
        )
    finally:
        cpu.stop()
        await asyncio.gather(*(client.close() for client in clients), return_exceptions=True)
    elapsed = time.perf_counter() - start
    throughputs, p50s, p99s = [], [], []
    for window in range(config.windows):
        low = measured_from + window * config.window_s
        high = low + config.window_s
        latencies = [lat for at, lat, ok in done if ok and low <= at < high]
        throughputs.append(len(latencies) / config.window_s)
        p50s.append(percentile(latencies, 50) * 1000)
        p99s.append(percentile(latencies, 99) * 1000)
    in_windows = sum(1 for at, _, ok in done if ok and measured_from <= at < stop_at)
    row: dict[str, Any] = {
        "concurrency": concurrency,
        "throughput_per_s": median(throughputs),
        "throughput_windows": throughputs,
        "p50_ms": median(p50s),
        "p99_ms": median(p99s),
        "requests": len(done),
        "errors": sum(1 for *_, ok in done if not ok),
        "client_cpu_pct": 100.0 * cpu.seconds / elapsed,
    }
    if len(server_cpu) == 2 and in_windows:
        row["server_cpu_ms_per_text"] = 1000.0 * (server_cpu[1] - server_cpu[0]) / in_windows
    return row


def _sweep(
    make: Callable[[], Awaitable[_Client]],
    config: EmbedConfig,
    server: servers.Server | None,
    corpora: list[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Every concurrency level on each corpus: ``{corpus: {level: row}}``."""

    async def main() -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        warm = await make()  # first request loads lazily in some servers; keep it out of the windows
        try:
            for _ in range(3):
                if (error := await warm.call("warm up")) is not None:
                    raise RuntimeError(f"warm-up request failed: {error}")
        finally:
            await warm.close()
        for corpus in corpora or config.corpora:
            texts = CORPORA[corpus](max(64, *config.concurrency))
            out[corpus] = {
                str(level): await _drive(make, level, config, texts, server) for level in config.concurrency
            }
        return out

    return asyncio.run(main())


class RawLimit:
    """The raw-encode subprocess (`raw_encode --serve`), asked for the limit next to every target.

    On a shared machine the limit drifts with other people's load; measuring it before each
    target and taking the median keeps the ratios honest.
    """

    def __init__(self, config: EmbedConfig) -> None:
        self.config = config
        self.samples: list[dict[str, Any]] = []
        procs.LOG_DIR.mkdir(parents=True, exist_ok=True)
        self._log = (procs.LOG_DIR / "raw_encode.log").open("wb")
        argv = [str(VENV_BIN / "python"), "-m", "bench.baselines.raw_encode", "--serve"]
        self._proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=base_env(),
            cwd=procs.REPO,
            start_new_session=True,
        )
        self._reply(180.0)

    def _reply(self, limit_s: float) -> dict[str, Any]:
        assert self._proc.stdout is not None
        deadline = time.monotonic() + limit_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._proc.stdout], [], [], left)[0]:
                raise ProcessFailed(f"raw encode did not answer within {limit_s:.0f} s")
            line = self._proc.stdout.readline()
            if not line:
                raise ProcessFailed(f"raw encode exited with {self._proc.wait()}")
            if line.startswith(b"{"):
                reply: dict[str, Any] = orjson.loads(line)
                return reply

    def measure(self) -> None:
        """One sample of the limit on every corpus (``{corpus: {size: figures}}``)."""
        assert self._proc.stdin is not None
        sample = {}
        for corpus in self.config.corpora:
            request = {"texts": self.config.concurrency, "repeats": self.config.raw_repeats, "corpus": corpus}
            self._proc.stdin.write(orjson.dumps(request) + b"\n")
            self._proc.stdin.flush()
            sample[corpus] = self._reply(300.0)
        self.samples.append(sample)

    def summary(self, corpus: str) -> dict[str, Any]:
        """The median of the samples per size; ``alone_*`` is the first sample, taken before any
        server had started."""
        out = {}
        samples = [sample[corpus] for sample in self.samples if corpus in sample]
        for size in map(str, self.config.concurrency):
            rows = [sample[size] for sample in samples]
            out[size] = {
                "texts_per_s": median([row["texts_per_s"] for row in rows]),
                "latency_ms": median([row["latency_ms"] for row in rows]),
                "cpu_ms_per_text": median([row["cpu_ms_per_text"] for row in rows]),
                "samples_texts_per_s": [row["texts_per_s"] for row in rows],
                "best_threads": [row["best_threads"] for row in rows],
                "alone_texts_per_s": rows[0]["texts_per_s"],
            }
        return out

    def close(self) -> None:
        if self._proc.stdin is not None:
            with contextlib.suppress(OSError):
                self._proc.stdin.close()
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(5)
        self._log.close()


@contextlib.contextmanager
def _recording(results: dict[str, Any], unavailable: dict[str, str], *names: str) -> Iterator[None]:
    """Record a target that cannot start (or fails) as unavailable with the reason, and go on."""
    try:
        yield
    except Exception as exc:  # one broken target must not end the whole run
        for name in names:
            results.pop(name, None)
            unavailable[name] = f"{type(exc).__name__}: {exc}"[:800]


def run(config: EmbedConfig) -> dict[str, Any]:
    targets: dict[str, Any] = {}
    unavailable: dict[str, str] = {}
    by_corpus: dict[str, dict[str, Any]] = {corpus: {} for corpus in config.corpora}
    out: dict[str, Any] = {
        "generator": GENERATOR,
        "corpora": {name: CORPORA[name].__doc__ for name in config.corpora},
        "targets": targets,
        "unavailable": unavailable,
    }
    raw: RawLimit | None = None
    with _recording(targets, unavailable, "raw"):
        raw = RawLimit(config)

    def limit() -> None:
        """Measure the limit again while no server runs (a failure only loses this sample)."""
        if raw is not None:
            try:
                raw.measure()
            except Exception as exc:  # this sample is lost; the others still give the limit
                out.setdefault("raw_errors", []).append(f"{type(exc).__name__}: {exc}"[:300])

    def record(name: str, rows: dict[str, dict[str, Any]]) -> None:
        for corpus, levels in rows.items():
            by_corpus[corpus][name] = levels

    try:
        limit()  # alone: before any server has started
        with _recording(targets, unavailable, "seed"), servers.seed() as seed:
            record("seed", _sweep(_http_client(seed.port, "/api/v1/embeddings", _seed_body), config, seed))

        reason = infinity_venv.ensure() if config.infinity else "skipped (--quick)"
        if reason is not None:
            unavailable["infinity"] = reason
        else:
            out["infinity_version"] = infinity_venv.version()
            limit()
            with _recording(targets, unavailable, "infinity"), servers.infinity() as inf:
                record("infinity", _sweep(_http_client(inf.port, "/embeddings", _infinity_body), config, inf))

        reason = servers.sluice_unavailable()
        if reason is not None:
            unavailable["sluice-ws"] = unavailable["sluice-http"] = reason
        else:
            limit()
            with (
                _recording(targets, unavailable, "sluice-ws", "sluice-http"),
                servers.sluice(label="embeddings") as sluice,
            ):
                with _recording(targets, unavailable, "sluice-ws"):
                    record("sluice-ws", _sweep(lambda: _ws_client(sluice), config, sluice))
                with _recording(targets, unavailable, "sluice-http"):
                    http = _http_client(sluice.port, "/api/v1/embeddings", _seed_body)
                    record("sluice-http", _sweep(http, config, sluice, config.http_corpora))
        limit()
    finally:
        if raw is not None:
            raw.close()
            if raw.samples:
                for corpus in config.corpora:
                    by_corpus[corpus]["raw"] = raw.summary(corpus)
            else:
                unavailable["raw"] = "; ".join(out.get("raw_errors", ["no sample"]))
    for corpus, found in by_corpus.items():
        for name, levels in found.items():
            if name not in unavailable:
                (targets if corpus == "mixed" else out.setdefault(corpus, {"targets": {}})["targets"])[
                    name
                ] = levels
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    result = run(EmbedConfig.quick() if args.quick else EmbedConfig())
    sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
