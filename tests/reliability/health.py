"""After the abuse: is the server still up, still serving, and did it log no crash?

`assert_server_healthy` checks what the reliability tests promise afterwards: the process runs,
``/health`` and ``/ready`` answer 200, a normal generation on a fresh connection streams exactly
the emulator's text, and (from a log offset on) the server logged no traceback. Test support.
"""

from __future__ import annotations

import time

import httpx

from tests.reliability.checks import StreamCheck
from tests.reliability.links import WsLink
from tests.reliability.resume import expected_record
from tests.support.ollama_emulator import Emulator
from tests.support.server import ServerProcess

__all__ = ["MODEL", "assert_server_healthy", "log_offset"]

MODEL = "llama3.2:1b"


def log_offset(server: ServerProcess) -> int:
    """Where the server's log ends now (pass it to `assert_server_healthy`)."""
    return len(server.log_text(tail=10**9))


async def assert_server_healthy(server: ServerProcess, emu: Emulator, log_start: int | None) -> None:
    """The process runs, answers /health and /ready, streams a normal generation exactly on a
    fresh connection, and (from ``log_start`` on) logged no traceback."""
    assert server.process.poll() is None, "the server exited"
    async with httpx.AsyncClient(timeout=10) as client:
        assert (await client.get(f"{server.url}/health")).status_code == 200
        assert (await client.get(f"{server.url}/ready")).status_code == 200
    link = await WsLink.open(server.ws_url, {})
    check = StreamCheck()
    prompt = f"after the fuzzing {time.monotonic_ns()}"
    await link.send({"type": "generate", "id": "after", "model": MODEL, "prompt": prompt})
    while check.terminal("after") is None:
        check.add(await link.recv(10))
    await link.close()
    terminal = check.terminal("after")
    assert terminal is not None and terminal["type"] == "done", terminal
    assert check.text("after") == emu.expected_text(expected_record(emu, prompt).body)
    if log_start is not None:
        log = server.log_text(tail=10**9)[log_start:]
        assert "Traceback" not in log, log[-4000:]
