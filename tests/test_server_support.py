"""The test server launcher (tests/support/server.py): a port it picked that another socket took
before the server bound it is not a failed start; the server starts again on another port."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import httpx
import pytest

from tests.support import server as support

ENV = {"SLUICE_LOAD_LOCAL_GENERATION": "false"}


@pytest.fixture
def taken() -> Iterator[int]:
    """A loopback port some other socket holds, listening, for the whole test."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


@pytest.mark.timeout(300)
def test_a_picked_port_taken_before_the_bind_is_replaced(taken: int, monkeypatch: pytest.MonkeyPatch) -> None:
    picks = iter([taken])
    real = support.free_port
    monkeypatch.setattr(support, "free_port", lambda: next(picks, None) or real())
    server = support.start_server(ENV)
    try:
        assert server.port != taken
        assert httpx.get(f"{server.url}/ready", timeout=10).status_code == 200
        assert server.url == f"http://127.0.0.1:{server.port}" and str(server.port) in server.ws_url
    finally:
        server.stop()
