"""Real servers for the end-to-end tests of the WebSocket transport: ``sluice serve`` subprocesses on loopback.

Three servers start together (their model loading overlaps) the first time a test asks for one:
``main`` (the Ollama emulator plus the real local models, small outbound bounds and message
limits), ``guarded`` (API keys, an origin allow-list, a request rate limit, a 1 s session TTL and
fast WebSocket pings) and ``draining`` (for the SIGTERM test, which stops it). All share one
Ollama emulator running in this process; `emu` resets its settings and records for each test.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.support.ollama_emulator import Emulator, start_emulator
from tests.support.server import ServerProcess

EMULATOR_DEFAULTS: dict[str, Any] = {"token_rate": 0.0, "tokens": 16, "first_token_delay_s": 0.0}

MAIN_ENV = {
    "SLUICE_OUTBOUND_SOFT_BYTES": "4096",
    "SLUICE_OUTBOUND_HARD_BYTES": "65536",
    "SLUICE_OUTBOUND_STALL_S": "8",
    "SLUICE_MAX_MESSAGE_BYTES": "4096",
    "SLUICE_MAX_FRAME_BYTES": "65536",
    "SLUICE_MAX_INFLIGHT": "6",
    "SLUICE_SOCKET_SEND_BUFFER_BYTES": "32768",
}
KEYS = ("key-auth", "key-ttl", "key-limited", "key-ping")
ALLOWED_ORIGIN = "https://app.example"
GUARDED_ENV = {
    "SLUICE_API_KEYS": ",".join(KEYS),
    "SLUICE_ALLOWED_ORIGINS": ALLOWED_ORIGIN,
    "SLUICE_REQUESTS_PER_MINUTE": "3",
    "SLUICE_SESSION_TTL_S": "1",
    "SLUICE_WS_PING_INTERVAL_S": "0.5",
    "SLUICE_WS_PING_TIMEOUT_S": "0.5",
    "SLUICE_LOAD_LOCAL_GENERATION": "false",
}
DRAINING_ENV = {"SLUICE_LOAD_LOCAL_GENERATION": "false", "SLUICE_DRAIN_TIMEOUT_S": "15"}


@dataclass(frozen=True)
class Servers:
    main: ServerProcess
    guarded: ServerProcess
    draining: ServerProcess


@pytest.fixture(scope="session")
def emulator() -> Iterator[Emulator]:
    with start_emulator(**EMULATOR_DEFAULTS) as emu:
        yield emu


@pytest.fixture
def emu(emulator: Emulator) -> Emulator:
    emulator.configure(**EMULATOR_DEFAULTS)
    emulator.reset()
    return emulator


@pytest.fixture(scope="session")
def servers(emulator: Emulator) -> Iterator[Servers]:
    upstream = {"SLUICE_OLLAMA_URLS": emulator.url}
    started = [
        ServerProcess(MAIN_ENV | upstream),
        ServerProcess(GUARDED_ENV | upstream),
        ServerProcess(DRAINING_ENV | upstream),
    ]
    try:
        for server in started:
            server.wait_ready()
        yield Servers(*started)
    finally:
        for server in started:  # all drain at once, then each is waited for
            server.signal()
        for server in started:
            server.stop()
