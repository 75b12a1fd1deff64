"""The servers a benchmark runs against, each started as a subprocess on a free loopback port.

`sluice(...)`, `seed(...)`, `emulator(...)` and `infinity(...)` are context managers yielding a
`Server` (port, URL, process counters) and stopping it on exit. `*_unavailable()` return why a
target cannot run here (not built yet, venv missing) or None, so a benchmark records the reason
instead of failing. This module never binds anything but 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import importlib.util
import signal
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.baselines import infinity as infinity_venv
from bench.procs import VENV_BIN, Proc, base_env, free_port, spawn

__all__ = [
    "EMBED_MODEL",
    "Server",
    "emulator",
    "emulator_unavailable",
    "infinity",
    "profile_into",
    "seed",
    "sluice",
    "sluice_unavailable",
]

EMBED_MODEL = "all-MiniLM-L6-v2"


@dataclass
class Server:
    name: str
    port: int
    proc: Proc

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/ws"


def sluice_unavailable() -> str | None:
    if importlib.util.find_spec("server.cli") is None:
        return "the sluice server is not built yet (server/cli.py missing)"
    if not (VENV_BIN / "sluice").exists():
        return f"{VENV_BIN / 'sluice'} missing (pip install -e . first)"
    return None


def emulator_unavailable() -> str | None:
    try:
        found = importlib.util.find_spec("tests.support.ollama_emulator")
    except ModuleNotFoundError:
        found = None
    return None if found is not None else "tests/support/ollama_emulator.py is not written yet"


@dataclass
class _Profiling:
    directory: Path | None = None
    started: int = 0


_PROFILING = _Profiling()


def profile_into(directory: Path | None) -> None:
    """Record every sluice server started from now on with py-spy (flame graph SVGs), or stop."""
    _PROFILING.directory = directory


@contextlib.contextmanager
def _profiled(server: Server, label: str) -> Iterator[None]:
    spy = VENV_BIN / "py-spy"
    if _PROFILING.directory is None or not spy.exists():
        yield
        return
    _PROFILING.directory.mkdir(parents=True, exist_ok=True)
    _PROFILING.started += 1
    output = _PROFILING.directory / f"{label}-{_PROFILING.started}.svg"
    argv = [str(spy), "record", "--pid", str(server.proc.pid), "--rate", "200", "--subprocesses"]
    argv += ["--format", "flamegraph", "--output", str(output), "--nonblocking"]
    recorder = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        recorder.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            recorder.wait(60)
        except subprocess.TimeoutExpired:
            recorder.kill()
            recorder.wait(5)


@contextlib.contextmanager
def sluice(
    *,
    ollama_url: str = "",
    local_generation: bool = False,
    extra_env: Mapping[str, str] | None = None,
    timeout: float = 240.0,
    label: str = "sluice",
) -> Iterator[Server]:
    """`sluice serve` on a free port, ready once `/ready` answers 200 (profiled when asked)."""
    port = free_port()
    env = base_env(
        {
            "SLUICE_HOST": "127.0.0.1",
            "SLUICE_PORT": str(port),
            "SLUICE_OLLAMA_URLS": ollama_url,
            "SLUICE_LOAD_LOCAL_GENERATION": "true" if local_generation else "false",
            "SLUICE_LOG_LEVEL": "warning",
            **(extra_env or {}),
        }
    )
    argv = [str(VENV_BIN / "sluice"), "serve", "--host", "127.0.0.1", "--port", str(port)]
    with spawn("sluice", argv, env=env, ready_url=f"http://127.0.0.1:{port}/ready", timeout=timeout) as proc:
        server = Server("sluice", port, proc)
        with _profiled(server, label):
            yield server


@contextlib.contextmanager
def seed(*, ollama_url: str = "http://127.0.0.1:9", timeout: float = 120.0) -> Iterator[Server]:
    """The seed-style baseline under uvicorn's defaults, access log off (see seed_service)."""
    port = free_port()
    argv = [
        str(VENV_BIN / "python"),
        "-m",
        "uvicorn",
        "bench.baselines.seed_service:app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-access-log",
        "--log-level",
        "warning",
    ]
    env = base_env({"SEED_OLLAMA_URL": ollama_url})
    with spawn("seed", argv, env=env, ready_url=f"http://127.0.0.1:{port}/health", timeout=timeout) as proc:
        yield Server("seed", port, proc)


@contextlib.contextmanager
def emulator(
    *,
    token_rate: float,
    tokens: int,
    first_token_delay_s: float = 0.0,
    lines_per_write: int = 1,
    timeout: float = 60.0,
) -> Iterator[Server]:
    """The Ollama emulator as a process (`python -m tests.support.ollama_emulator`).

    By default one piece per write and no line split across writes: how a real Ollama flushes each
    token, so the schedule the client sees is the emulator's (`--token-rate`), not an artefact of
    batching. `lines_per_write` > 1 is the fast mode for an unpaced stream: the emulator's cost per
    token falls with the writes, so it stays well above what the server under test can relay.
    uvloop keeps the emulator's own CPU cost low on the shared cores.
    """
    port = free_port()
    argv = [
        str(VENV_BIN / "python"),
        "-m",
        "tests.support.ollama_emulator",
        "--port",
        str(port),
        "--token-rate",
        str(token_rate),
        "--tokens",
        str(tokens),
        "--first-token-delay",
        str(first_token_delay_s),
        "--lines-per-write",
        str(lines_per_write),
        "--no-split",
        "--uvloop",
    ]
    with spawn("emulator", argv, ready_url=f"http://127.0.0.1:{port}/api/version", timeout=timeout) as proc:
        yield Server("emulator", port, proc)


def emulator_model(server: Server) -> str:
    """The first model the emulator lists in `/api/tags` (what a relayed `generate` asks for)."""
    tags = httpx.get(f"{server.url}/api/tags", timeout=10).json()
    models = tags.get("models") or []
    return str(models[0]["name"]) if models else "llama3.2"


@contextlib.contextmanager
def infinity(*, batch_size: int = 64, timeout: float = 180.0) -> Iterator[Server]:
    """infinity-emb from its own venv, serving the shipped MiniLM by local path, offline."""
    port = free_port()
    argv = [
        str(infinity_venv.VENV / "bin" / "infinity_emb"),
        "v2",
        "--model-id",
        infinity_venv.model_path(),
        "--served-model-name",
        EMBED_MODEL,
        "--engine",
        "torch",
        "--device",
        "cpu",
        "--batch-size",
        str(batch_size),
        "--no-vector-disk-cache",
        "--no-model-warmup",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    env = base_env({"DO_NOT_TRACK": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0"})
    env.pop("PYTHONPATH", None)  # its own venv; nothing of this repo should shadow its imports
    with spawn(
        "infinity", argv, env=env, ready_url=f"http://127.0.0.1:{port}/health", timeout=timeout
    ) as proc:
        yield Server("infinity", port, proc)
