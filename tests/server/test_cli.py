"""`sluice serve`'s uvicorn set-up: uvloop and httptools named, the start-up heap frozen after loading."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator

import pytest
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from server import cli
from server.api.httpbody import BodyProtocol
from server.settings import Settings
from server.transports.wsframes import FramesProtocol


@pytest.fixture
def unfrozen() -> Iterator[None]:
    thresholds = gc.get_threshold()
    gc.unfreeze()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


def test_uvicorn_runs_on_uvloop_httptools_and_the_frames_protocol() -> None:
    config = cli.uvicorn_config(None, Settings())
    assert (config.loop, config.http, config.ws) == ("uvloop", BodyProtocol, FramesProtocol)
    config.load()  # imports the named implementations: fails here when one is missing
    assert config.http_protocol_class is BodyProtocol
    assert issubclass(BodyProtocol, HttpToolsProtocol)
    assert config.ws_protocol_class is FramesProtocol
    assert issubclass(FramesProtocol, WebSocketsSansIOProtocol)


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        ({"local": {"embed:m": {"state": "loading"}}, "ollama": {"state": "ready"}}, True),
        ({"local": {"embed:m": {"state": "ready"}}, "ollama": {"state": "loading"}}, True),
        ({"local": {"embed:m": {"state": "failed"}}, "ollama": {"state": "unavailable"}}, False),
        ({"local": {}, "ollama": {"state": "ready"}}, False),
        ({}, False),
    ],
)
def test_loading_reads_the_registry_status(status: dict[str, object], expected: bool) -> None:
    assert cli.loading(status) is expected


async def test_the_heap_is_frozen_at_start_and_again_once_nothing_is_loading(unfrozen: None) -> None:
    answers = iter(["loading", "loading", "ready"])
    asked = 0
    frozen_while_loading: list[int] = []

    def status() -> dict[str, object]:
        nonlocal asked
        asked += 1
        frozen_while_loading.append(gc.get_freeze_count())
        return {"local": {"embed:m": {"state": next(answers)}}}

    kept = [object() for _ in range(10)]  # noqa: F841  # alive at start-up: frozen
    await asyncio.wait_for(cli.freeze_after_loading(status), 5)
    assert asked == 3
    assert frozen_while_loading[0] > 0  # the first freeze happens before any model is in
    assert gc.get_threshold() == cli.GC_THRESHOLDS
    late = [[n] for n in range(1000)]  # allocated while loading: frozen by the second freeze
    gc.unfreeze()
    await asyncio.wait_for(cli.freeze_after_loading(lambda: {}), 5)
    assert gc.get_freeze_count() >= len(late)
