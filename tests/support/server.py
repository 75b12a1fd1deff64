"""A real sluice server for tests: ``sluice serve`` as a uvicorn subprocess on 127.0.0.1.

``with run_server({"SLUICE_OLLAMA_URLS": emu.url}) as base_url: ...`` starts the server on a free
port with that environment (added to this process's, with the HF/transformers offline switches
on and Ollama off unless the env names it), waits until ``GET /ready`` answers 200, yields
``http://127.0.0.1:<port>``, and stops the process on exit (SIGTERM, then SIGKILL after a grace
period). `start_server` gives the `ServerProcess` itself, for tests that signal it or read its
log. The server's stdout and stderr go to a temporary file; when it fails to start, the error
carries the end of that log.

Session-scoped fixture pattern (one server shared by a test module or the whole run)::

    @pytest.fixture(scope="session")
    def emulator() -> Iterator[Emulator]:
        with start_emulator(token_rate=200) as emu:
            yield emu

    @pytest.fixture(scope="session")
    def base_url(emulator: Emulator) -> Iterator[str]:
        with run_server({"SLUICE_OLLAMA_URLS": emulator.url}) as url:
            yield url

This is test support: it must never be imported by ``server/``, and never binds beyond loopback.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

__all__ = ["ServerProcess", "free_port", "run_server", "start_server"]

ROOT = Path(__file__).resolve().parents[2]
# Loading the models can take a while on a busy 2-core machine (the first run converts the GGUF).
READY_TIMEOUT_S = 240.0
STOP_TIMEOUT_S = 30.0
# How many times a server whose picked port was taken before it bound it is started on another.
PORT_RETRIES = 3


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _sluice_command() -> list[str]:
    script = Path(sys.executable).with_name("sluice")
    if script.exists():
        return [str(script), "serve"]
    return [sys.executable, "-m", "server", "serve"]


class ServerProcess:
    """A running ``sluice serve``; `stop` it (or use `run_server`, which does)."""

    def __init__(self, env: dict[str, str] | None = None, *, port: int | None = None) -> None:
        self._env = dict(os.environ)
        self._env.update(
            {
                "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false",
                "SLUICE_OLLAMA_URLS": "",
                "SLUICE_HOST": "127.0.0.1",
            }
        )
        self._env.update(env or {})
        # A port picked here may be taken (by any process's outgoing connection) before the
        # server binds it: `wait_ready` then starts it again on another one. A given port is kept.
        self._picked = port is None
        self._spawn(port if port is not None else free_port())

    def _spawn(self, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.ws_url = f"ws://127.0.0.1:{port}/v1/ws"
        self._log = tempfile.NamedTemporaryFile(prefix="sluice-server-", suffix=".log", delete=False)
        self.log_path = Path(self._log.name)
        self.process = subprocess.Popen(
            _sluice_command(),
            cwd=ROOT,
            env=self._env | {"SLUICE_PORT": str(port)},
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def log_text(self, tail: int = 200_000) -> str:
        self._log.flush()
        text = self.log_path.read_text(errors="replace")
        return text[-tail:]

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        respawns = PORT_RETRIES
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    if self._picked and respawns and "address already in use" in self.log_text(4000).lower():
                        respawns -= 1
                        self._close_log()
                        self._spawn(free_port())
                        continue
                    raise RuntimeError(
                        f"sluice exited with {self.process.returncode} before it was ready:\n{self.log_text(4000)}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"{self.url}/ready").status_code == 200:
                        return
                time.sleep(0.1)
        raise RuntimeError(f"sluice was not ready within {timeout:.0f} s:\n{self.log_text(4000)}")

    def signal(self, signum: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signum)

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._close_log()

    def _close_log(self) -> None:
        self._log.close()
        with contextlib.suppress(OSError):
            self.log_path.unlink()


def start_server(
    env: dict[str, str] | None = None, *, port: int | None = None, ready_timeout: float = READY_TIMEOUT_S
) -> ServerProcess:
    """Start a server and wait for ``/ready``; the caller must `ServerProcess.stop` it."""
    server = ServerProcess(env, port=port)
    try:
        server.wait_ready(ready_timeout)
    except BaseException:
        server.stop()
        raise
    return server


@contextlib.contextmanager
def run_server(env: dict[str, str] | None = None, *, port: int | None = None) -> Iterator[str]:
    """A ready server for the ``with`` block; yields its base URL (``http://127.0.0.1:<port>``)."""
    server = start_server(env, port=port)
    try:
        yield server.url
    finally:
        server.stop()
