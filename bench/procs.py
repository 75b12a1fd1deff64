"""Subprocesses for benchmarks: start one, wait until it serves, read its CPU and memory, stop it.

Every process a benchmark starts runs in its own process group and is stopped (TERM, then KILL)
when the `spawn` block exits, whatever happened inside it. This module never starts anything
that listens beyond 127.0.0.1 and never leaves a process running.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

__all__ = [
    "LOG_DIR",
    "REPO",
    "VENV_BIN",
    "Proc",
    "ProcessFailed",
    "base_env",
    "free_port",
    "raise_nofile",
    "set_log_dir",
    "spawn",
]

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = REPO / ".venv" / "bin"
LOG_DIR = REPO / "bench" / "results" / "tmp" / "logs"


def set_log_dir(path: Path) -> None:
    """Send the logs of every process started from now on to `path` (one file per process name)."""
    global LOG_DIR
    LOG_DIR = path


class ProcessFailed(RuntimeError):
    """A subprocess exited or never became ready; the message ends with the tail of its log."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def raise_nofile(wanted: int = 65536) -> int:
    """Raise this process's open-file soft limit towards `wanted` (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(wanted, hard) if hard != resource.RLIM_INFINITY else wanted
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def base_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment every benchmark subprocess gets: offline models, repo importable."""
    env = dict(os.environ)
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": str(REPO),
        }
    )
    env.update(extra or {})
    return env


@dataclass
class Proc:
    """A started subprocess with its log; counters cover the process and its children."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    _ps: psutil.Process = field(init=False)

    def __post_init__(self) -> None:
        self._ps = psutil.Process(self.popen.pid)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def _tree(self) -> list[psutil.Process]:
        try:
            return [self._ps, *self._ps.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def cpu_seconds(self) -> float:
        """User + system CPU seconds used so far by the process and its live children."""
        total = 0.0
        for proc in self._tree():
            with contextlib.suppress(psutil.NoSuchProcess):
                times = proc.cpu_times()
                total += times.user + times.system
        return total

    def rss_bytes(self) -> int:
        total = 0
        for proc in self._tree():
            with contextlib.suppress(psutil.NoSuchProcess):
                total += proc.memory_info().rss
        return total

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 10.0) -> None:
        if self.popen.poll() is not None:
            return
        # The whole group: uvicorn or a venv launcher may have children of their own.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(5)


def _ready(url: str | None, port: int | None) -> bool:
    if url is not None:
        try:
            return httpx.get(url, timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False
    assert port is not None
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def spawn(
    name: str,
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    ready_url: str | None = None,
    ready_port: int | None = None,
    timeout: float = 120.0,
    cwd: Path = REPO,
) -> Iterator[Proc]:
    """Start `argv`, wait until `ready_url` answers 200 (or `ready_port` accepts), yield, stop.

    Raises `ProcessFailed` (with the log's tail) when the process exits or is not ready in time.
    """
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log_path = LOG_DIR / f"{name}.log"
    with log_path.open("wb") as log:
        popen = subprocess.Popen(
            list(argv),
            cwd=cwd,
            env=dict(env) if env is not None else base_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    proc = Proc(name, popen, log_path)
    try:
        deadline = time.monotonic() + timeout
        while not _ready(ready_url, ready_port):
            if not proc.alive():
                raise ProcessFailed(f"{name} exited with {popen.returncode}:\n{proc.log_tail()}")
            if time.monotonic() > deadline:
                raise ProcessFailed(f"{name} not ready after {timeout:.0f} s:\n{proc.log_tail()}")
            time.sleep(0.2)
        yield proc
    finally:
        proc.stop()
