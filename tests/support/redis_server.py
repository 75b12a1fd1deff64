"""A real Redis for tests: Debian's ``redis-server`` as a subprocess on a free loopback port.

``with run_redis() as redis: ... redis.url ...`` starts ``redis-server`` bound to 127.0.0.1 on a
free port, with its working directory (dump, AOF, log) in a temporary directory, waits until it
answers (and that the answer comes from its own process, not another server on the port), yields the `RedisServer`, and always stops it and removes the directory on exit.
In between a test can:

- `RedisServer.stop` it (the port stays reserved for this server) and `RedisServer.start` it again:
  "Redis unreachable for a while";
- `RedisServer.restart` it on the same port: ``restart()`` keeps the data (a forced RDB save
  before the shutdown, loaded again at start), ``restart(empty=True)`` comes back with nothing
  (a SIGKILL, then the dump and AOF files deleted): "Redis restarted empty";
- `RedisServer.kill` it (SIGKILL, no save: whatever was not persisted is gone);
- send it any command with `RedisServer.command` (a minimal RESP2 client over a plain socket, so
  the helper needs no Redis client library).

Persistence is off by default (no RDB save points, no AOF): pass ``appendonly=True`` or
``save="1 1"`` to test a persistence setting. Session-scoped fixture pattern::

    @pytest.fixture(scope="session")
    def redis() -> Iterator[RedisServer]:
        with run_redis() as server:
            yield server

When ``redis-server`` is not installed, `run_redis` skips the test, saying so (``make test``
installs the Debian package when it is missing). This is test support: it must never be imported
by ``server/``, never binds beyond 127.0.0.1, and never touches a system Redis or its config.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["RedisError", "RedisServer", "redis_server_binary", "run_redis"]

START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0
# How many times a first start whose picked port was taken before Redis bound it picks another.
PORT_RETRIES = 3
_Reply = bytes | int | str | list["_Reply"] | None


class RedisError(Exception):
    """An error reply (``-ERR ...``) from the server."""


def redis_server_binary() -> str | None:
    """The path of ``redis-server``, or None when it is not installed."""
    return shutil.which("redis-server")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _encode_command(args: tuple[str | bytes | int, ...]) -> bytes:
    parts = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def _read_reply(reader: BinaryIO) -> _Reply:
    line = reader.readline()
    if not line.endswith(b"\r\n"):
        raise ConnectionError("redis closed the connection mid-reply")
    kind, body = line[:1], line[1:-2]
    if kind == b"+":
        return body.decode()
    if kind == b"-":
        raise RedisError(body.decode())
    if kind == b":":
        return int(body)
    if kind == b"$":
        size = int(body)
        if size < 0:
            return None
        return reader.read(size + 2)[:-2]
    if kind == b"*":
        count = int(body)
        if count < 0:
            return None
        return [_read_reply(reader) for _ in range(count)]
    raise ConnectionError(f"unexpected reply from redis: {line[:40]!r}")


class RedisServer:
    """One ``redis-server`` on 127.0.0.1 with its own temporary directory; see the module doc."""

    def __init__(self, *, port: int | None = None, appendonly: bool = False, save: str = "") -> None:
        binary = redis_server_binary()
        if binary is None:
            raise FileNotFoundError("redis-server is not installed (Debian package redis-server)")
        self.binary = binary
        self.port = port if port is not None else _free_port()
        # Until it first starts, a port picked here that another socket took before Redis bound
        # it is replaced by another (`start`); a given port, or one Redis has held, is kept.
        self._repick = port is None
        self.host = "127.0.0.1"
        self.url = f"redis://{self.host}:{self.port}/0"
        self.appendonly = appendonly
        self.save = save
        self.dir = Path(tempfile.mkdtemp(prefix="sluice-redis-"))
        self.log_path = self.dir / "redis.log"
        self.process: subprocess.Popen[bytes] | None = None

    # -- lifecycle --------------------------------------------------------------------------

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        """Start the server (on the same port and directory as before) and wait until it answers."""
        if self.running:
            return
        for attempt in range(PORT_RETRIES + 1):
            try:
                self._start(timeout)
                break
            except RuntimeError:
                if not (
                    self._repick and attempt < PORT_RETRIES and "Address already in use" in self.log_text()
                ):
                    raise
                self.log_path.unlink(missing_ok=True)
                self.port = _free_port()
                self.url = f"redis://{self.host}:{self.port}/0"
        self._repick = False

    def _start(self, timeout: float) -> None:
        command = [
            self.binary,
            "--bind",
            self.host,
            "--port",
            str(self.port),
            "--dir",
            str(self.dir),
            "--logfile",
            str(self.log_path),
            "--daemonize",
            "no",
            "--protected-mode",
            "yes",
            "--save",
            self.save,
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--dbfilename",
            "dump.rdb",
        ]
        self.process = subprocess.Popen(
            command,
            cwd=self.dir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code = self.process.returncode
                self.process = None
                raise RuntimeError(f"redis-server exited with {code} at start:\n{self.log_text()}")
            with contextlib.suppress(OSError, ConnectionError, RedisError):
                if self._answering_pid() == self.process.pid:  # not some other server on the port
                    return
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"redis-server did not answer PING within {timeout:.0f} s:\n{self.log_text()}")

    def _answering_pid(self) -> int | None:
        info = self.command("INFO", "server", timeout=1.0)
        if not isinstance(info, bytes):
            return None
        for line in info.decode().splitlines():
            if line.startswith("process_id:"):
                return int(line.partition(":")[2])
        return None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after a grace period); the data is not saved
        unless a persistence setting saves it. The port and directory stay for `start`."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(STOP_TIMEOUT_S)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no save."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(STOP_TIMEOUT_S)

    def restart(self, *, empty: bool = False) -> None:
        """Stop and start again on the same port. ``empty=False`` keeps every key (a forced save
        first); ``empty=True`` comes back with no data at all, whatever the persistence setting."""
        if empty:
            self.kill()
            for name in ("dump.rdb", "appendonly.aof", "appendonlydir"):
                path = self.dir / name
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        elif self.running:
            self.command("SAVE")
            self.stop()
        self.start()

    def close(self) -> None:
        """Stop the server and remove its directory."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def log_text(self, tail: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return "(no log)"

    # -- a minimal client -------------------------------------------------------------------

    def command(self, *args: str | bytes | int, timeout: float = 5.0) -> _Reply:
        """Send one command on a fresh connection and return its reply (bytes for bulk strings,
        str for simple strings, int, list, None); an error reply raises `RedisError`."""
        with socket.create_connection((self.host, self.port), timeout=timeout) as conn:
            conn.sendall(_encode_command(args))
            with conn.makefile("rb") as reader:
                return _read_reply(reader)


@contextlib.contextmanager
def run_redis(*, appendonly: bool = False, save: str = "") -> Iterator[RedisServer]:
    """A running Redis for the ``with`` block, always stopped and cleaned up after; skips the test
    when ``redis-server`` is not installed."""
    if redis_server_binary() is None:
        import pytest

        pytest.skip("redis-server is not installed (make test installs the Debian package redis-server)")
    server = RedisServer(appendonly=appendonly, save=save)
    try:
        server.start()
        yield server
    finally:
        server.close()
