"""One Ollama emulator and real sluice servers shared by the reliability tests.

``server`` (fuzzing, resume) and ``fault_server`` (short upstream timeouts) are
`tests.reliability.serving` servers, started the first time a test asks for one and stopped at
the end of the run; both use the one emulator, and `emu` resets its settings and records for
each test.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.reliability.serving import FAULT_ENV, sse_available, start_reliability_server
from tests.reliability.upstream_proxy import UpstreamProxy, start_proxy
from tests.support.ollama_emulator import Emulator, start_emulator
from tests.support.server import ServerProcess

EMULATOR_DEFAULTS: dict[str, Any] = {
    "token_rate": 0.0,
    "tokens": 16,
    "first_token_delay_s": 0.0,
    "fault_after": 3,
}


@pytest.fixture(scope="session")
def emulator() -> Iterator[Emulator]:
    with start_emulator(advertise_faults=True, **EMULATOR_DEFAULTS) as emu:
        yield emu


@pytest.fixture
def emu(emulator: Emulator) -> Emulator:
    emulator.configure(**EMULATOR_DEFAULTS)
    emulator.reset()
    return emulator


@pytest.fixture(scope="session")
def server(emulator: Emulator) -> Iterator[ServerProcess]:
    process = start_reliability_server({"SLUICE_OLLAMA_URLS": emulator.url})
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="session")
def proxy(emulator: Emulator) -> Iterator[UpstreamProxy]:
    with start_proxy(emulator.url) as upstream:
        yield upstream


@pytest.fixture(scope="session")
def fault_server(proxy: UpstreamProxy) -> Iterator[ServerProcess]:
    """Short upstream timeouts; its Ollama is the emulator behind `proxy`, which can kill a stream."""
    process = start_reliability_server({"SLUICE_OLLAMA_URLS": proxy.url}, base=FAULT_ENV)
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="session")
def has_sse(server: ServerProcess) -> bool:
    return sse_available(server.url)
