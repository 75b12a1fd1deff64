"""`OllamaHealth`: reachability and the model list, refreshed when stale, never raising."""

from __future__ import annotations

import asyncio
import logging

import pytest

from server.backends.base import BackendState
from server.backends.ollama.health import REFRESH_S, OllamaControl, OllamaHealth

URLS = ["http://a:11434", "http://b:11434"]


class FakeControl:
    def __init__(self) -> None:
        self.up = {url: True for url in URLS}
        self.models = ["llama3.2:1b", "qwen2.5:0.5b", "llama3.2:1b"]
        self.probes = 0
        self.lists = 0
        self.probe_error: Exception | None = None
        self.list_error: Exception | None = None
        self.gate: asyncio.Event | None = None

    async def probe(self) -> dict[str, bool]:
        self.probes += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.probe_error is not None:
            raise self.probe_error
        return dict(self.up)

    async def list_models(self) -> list[str]:
        self.lists += 1
        if self.list_error is not None:
            raise self.list_error
        return list(self.models)

    async def aclose(self) -> None:
        pass


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_fake_is_a_control() -> None:
    assert isinstance(FakeControl(), OllamaControl)


def test_before_attaching_it_is_loading_or_unconfigured() -> None:
    assert OllamaHealth(URLS).status() == {
        "configured": True,
        "state": BackendState.LOADING,
        "urls": dict.fromkeys(URLS, False),
        "models": 0,
    }
    assert OllamaHealth([]).status()["state"] == BackendState.UNAVAILABLE
    failed = OllamaHealth(URLS)
    failed.failed()
    assert failed.state == BackendState.FAILED


async def test_attach_probes_and_lists_each_model_once() -> None:
    health, control = OllamaHealth(URLS), FakeControl()
    control.up[URLS[1]] = False
    await health.attach(control)
    assert health.state == BackendState.READY
    assert health.models == ["llama3.2:1b", "qwen2.5:0.5b"]
    assert health.status()["urls"] == {URLS[0]: True, URLS[1]: False}


async def test_refresh_looks_again_only_when_stale() -> None:
    clock = Clock()
    health, control = OllamaHealth(URLS, clock=clock), FakeControl()
    await health.attach(control)
    await health.refresh()
    assert (control.probes, control.lists) == (1, 1)
    clock.now += REFRESH_S
    control.models = ["mistral:7b"]
    await health.refresh()
    assert (control.probes, control.lists) == (2, 2)
    assert health.models == ["mistral:7b"]


async def test_nobody_answering_is_unavailable_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    health, control = OllamaHealth(URLS, clock=clock), FakeControl()
    await health.attach(control)
    control.up = dict.fromkeys(URLS, False)
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            clock.now += REFRESH_S
            await health.refresh()
    assert health.state == BackendState.UNAVAILABLE
    assert control.lists == 1  # nothing to list from when nobody answers
    assert health.models == ["llama3.2:1b", "qwen2.5:0.5b"]  # the last list stays
    assert sum("unreachable" in record.getMessage() for record in caplog.records) == 1


async def test_a_failing_probe_or_listing_never_raises() -> None:
    clock = Clock()
    health, control = OllamaHealth(URLS, clock=clock), FakeControl()
    control.probe_error = OSError("boom")
    await health.attach(control)
    assert health.state == BackendState.UNAVAILABLE
    assert health.status()["urls"] == dict.fromkeys(URLS, False)
    control.probe_error = None
    control.list_error = RuntimeError("tags broke")
    clock.now += REFRESH_S
    await health.refresh()
    assert health.state == BackendState.READY and health.models == []


async def test_refresh_soon_runs_one_background_refresh_and_close_stops_it() -> None:
    clock = Clock()
    health, control = OllamaHealth(URLS, clock=clock), FakeControl()
    health.refresh_soon()  # nothing attached: nothing to do
    await health.attach(control)
    health.refresh_soon()  # fresh: nothing to do
    await asyncio.sleep(0)
    assert control.probes == 1
    clock.now += REFRESH_S
    control.gate = asyncio.Event()
    health.refresh_soon()
    health.refresh_soon()  # one is running already
    await asyncio.sleep(0.01)
    assert control.probes == 2
    await health.close()  # cancels the refresh stuck on the gate
    health.refresh_soon()
    await asyncio.sleep(0.01)
    assert control.probes == 2
