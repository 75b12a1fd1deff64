"""Fixtures for the Python client's tests.

`fake` / `fake_sse`: a fake server per test (cheap: one thread, one loop). `emulator` and
`real_server`: one Ollama emulator and one real ``sluice serve`` for the whole run, started only
when a test asks for them (loading the local embedding and classification models takes ~20 s).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.client_python.fake_server import FakeServer
from tests.client_python.knobs import REAL_MODEL
from tests.support.ollama_emulator import Emulator, start_emulator
from tests.support.server import run_server


@pytest.fixture
def fake() -> Iterator[FakeServer]:
    with FakeServer() as server:
        yield server


@pytest.fixture
def fake_sse() -> Iterator[FakeServer]:
    with FakeServer(sse=True) as server:
        yield server


@pytest.fixture(scope="session")
def emulator() -> Iterator[Emulator]:
    with start_emulator(token_rate=200, tokens=16) as emu:
        yield emu


@pytest.fixture(scope="session")
def real_server(emulator: Emulator) -> Iterator[str]:
    env = {
        "SLUICE_OLLAMA_URLS": emulator.url,
        "SLUICE_DEFAULT_MODEL": REAL_MODEL,
        # The local SmolLM2 is not needed here (generation goes to the emulator); skipping it
        # saves most of the start-up time.
        "SLUICE_LOAD_LOCAL_GENERATION": "0",
    }
    with run_server(env) as url:
        yield url


@pytest.fixture
def emu(emulator: Emulator) -> Iterator[Emulator]:
    """The shared emulator, reset to the default pace for each test."""
    emulator.configure(token_rate=200, tokens=16)
    emulator.reset()
    yield emulator
    emulator.configure(token_rate=200, tokens=16)
