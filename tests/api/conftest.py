"""One real sluice server (and one Ollama emulator) shared by the HTTP API tests.

The server runs ``sluice serve`` as a subprocess on loopback (`tests.support.server`) with the
emulator as its Ollama and local generation off (generation goes to the emulator, whose text is
deterministic; embeddings and classification use the real local MiniLM models). The emulator is
unpaced by default; tests that need a generation to last use `paced`, which restores it after.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.support.ollama_emulator import Emulator, start_emulator
from tests.support.server import ServerProcess, start_server

# Emulated pieces in a generation that is not cut short (tests pass max_tokens to shorten one).
TOKENS = 200
SERVER_ENV = {
    "SLUICE_LOAD_LOCAL_GENERATION": "false",
    "SLUICE_SSE_KEEPALIVE_S": "1",
    "SLUICE_SSE_RETRY_MS": "250",
    "SLUICE_LOG_LEVEL": "warning",
}
MODEL = "llama3.2:1b"


@contextlib.contextmanager
def sluice(env: dict[str, str]) -> Iterator[ServerProcess]:
    """A ready server with ``env`` (on top of `SERVER_ENV`), stopped afterwards."""
    process = start_server({**SERVER_ENV, **env})
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="session")
def emulator() -> Iterator[Emulator]:
    with start_emulator(tokens=TOKENS, token_rate=0.0) as emu:
        yield emu


@pytest.fixture(scope="session")
def server(emulator: Emulator) -> Iterator[ServerProcess]:
    with sluice({"SLUICE_OLLAMA_URLS": emulator.url}) as process:
        yield process


@pytest.fixture(scope="session")
def base_url(server: ServerProcess) -> str:
    return server.url


@pytest.fixture
def paced(emulator: Emulator) -> Iterator[Callable[..., None]]:
    """``paced(token_rate=…, tokens=…)`` for the requests that start from then on; undone after."""
    before = emulator.config

    def set_pace(**changes: Any) -> None:
        emulator.configure(**changes)

    yield set_pace
    emulator.configure(token_rate=before.token_rate, tokens=before.tokens)
