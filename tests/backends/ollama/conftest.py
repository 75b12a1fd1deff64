"""Fixtures the Ollama backend's tests share: the emulator on loopback, and a backend on it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from server.backends.ollama.backend import OllamaBackend
from tests.backends.ollama.test_backend import make_settings
from tests.support.ollama_emulator import Emulator, start_emulator


@pytest.fixture
def emu() -> Iterator[Emulator]:
    with start_emulator(token_rate=400, tokens=16) as emulator:
        yield emulator


@pytest.fixture
async def backend(emu: Emulator) -> AsyncIterator[OllamaBackend]:
    ollama = OllamaBackend(make_settings(emu.url))
    yield ollama
    await ollama.aclose()
