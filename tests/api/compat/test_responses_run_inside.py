"""`ResponseRun` and `ResponseRuns` from the inside, with a scripted generation (no server, no
network): readers before, during and after the run see the same consecutive events, a cancel
closes the generation (even one cancelled before its task ran) and keeps the text so far, a
failure ends ``response.failed``, and the registry forgets, keeps, bounds and expires runs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

import pytest

from protocol.errors import ErrorCode, SluiceError
from protocol.messages import Timings, Usage
from server.api.calls import Generation
from server.api.compat.responses_model import ResponsesRequest, plan
from server.api.compat.responses_run import TERMINAL, ResponseRun, ResponseRuns, _Draft
from server.api.compat.responses_store import MemoryResponseStore
from server.backends.base import ToolCall
from server.dispatcher import Finished

pytestmark = pytest.mark.timeout(30)

PIECES = ["Once ", "upon ", "a ", "time"]


class Script:
    """A generation whose pieces come when the test releases them; it records being closed."""

    def __init__(self, pieces: list[str], *, fail: bool = False) -> None:
        self.pieces, self.fail = pieces, fail
        self.gate = asyncio.Queue[int]()
        self.closed = False

    def release(self, count: int = 1) -> None:
        for _ in range(count):
            self.gate.put_nowait(1)

    async def _stream(self) -> AsyncGenerator[str | ToolCall | Finished, None]:
        try:
            yield self.pieces[0]
            for piece in self.pieces[1:]:
                await self.gate.get()
                yield piece
            await self.gate.get()
            if self.fail:
                raise SluiceError(ErrorCode.UPSTREAM_ERROR, "the upstream broke")
            usage = Usage(prompt_tokens=3, completion_tokens=len(self.pieces))
            timings = Timings(queue_ms=0.0, ttft_ms=1.0, total_ms=2.0)
            yield Finished(finish_reason="stop", usage=usage, timings=timings, model="scripted")
        finally:
            self.closed = True

    async def generation(self) -> Generation:
        """Started as `server.api.calls.open_generation` starts one: its first item read."""
        stream = self._stream()
        return Generation(first=await anext(stream), rest=stream, model="scripted", started_at=0.0)


def _run(runs: ResponseRuns, owner: str = "k", **fields: Any) -> ResponseRun:
    body = ResponsesRequest.model_validate({"model": "scripted", "input": "Tell me", **fields})
    planned = plan(body, [])
    run = ResponseRun(_Draft(body, planned, owner, planned.input_items), runs.store, runs.finished)
    runs.add(run)
    return run


def _runs(**settings: Any) -> ResponseRuns:
    store = MemoryResponseStore(ttl_s=60, max_count=8)
    return ResponseRuns(store, **{"ttl_s": 60.0, "max_count": 8, **settings})


async def _read(run: ResponseRun, after: int = -1) -> list[dict[str, Any]]:
    return [event async for event in run.events(after)]


def _text(events: list[dict[str, Any]]) -> str:
    return "".join(event["delta"] for event in events if event["type"] == "response.output_text.delta")


async def test_readers_early_late_and_after_n_see_the_same_events() -> None:
    runs = _runs()
    script = Script(PIECES)
    run = _run(runs, background=True)
    run.start(await script.generation())
    early = asyncio.create_task(_read(run))
    await asyncio.sleep(0)
    script.release(2)
    await asyncio.sleep(0.01)
    middle = asyncio.create_task(_read(run, after=3))
    script.release(3)
    view = await run.wait()
    whole, from_four, late = await early, await middle, await _read(run)
    assert [event["sequence_number"] for event in whole] == list(range(len(whole)))
    assert from_four == whole[4:] and late == whole
    assert whole[-1]["type"] in TERMINAL and _text(whole) == "".join(PIECES)
    assert view["status"] == "completed" and view["output"][0]["content"][0]["text"] == "".join(PIECES)
    assert await _read(run, after=len(whole) + 5) == [] and script.closed


async def test_cancel_mid_stream_closes_the_generation_and_keeps_the_text() -> None:
    runs = _runs()
    script = Script(PIECES)
    run = _run(runs, background=True)
    run.start(await script.generation())
    script.release(1)
    await asyncio.sleep(0.01)
    assert run.current()["output"][0]["content"][0]["text"] == "Once upon "
    reader = asyncio.create_task(_read(run))
    view = await run.cancel()
    assert script.closed and run.done and view["status"] == "cancelled"
    (item,) = view["output"]
    assert item["status"] == "incomplete" and item["content"][0]["text"] == "Once upon "
    events = await reader
    assert not any(event["type"] in TERMINAL for event in events) and _text(events) == "Once upon "
    assert (await runs.store.get(run.id, "k")) is not None
    assert (await runs.store.get(run.id, "k")).response["status"] == "cancelled"  # type: ignore[union-attr]
    assert (await run.cancel())["status"] == "cancelled"  # again: as it is


async def test_a_run_stopped_before_its_task_ran_still_settles_and_closes() -> None:
    runs = _runs()
    script = Script(PIECES)
    run = _run(runs, background=True)
    run.start(await script.generation())
    run.stop()  # before the task's first step
    view = await run.wait()
    assert view["status"] == "cancelled" and run.done and script.closed
    assert await _read(run) == []


async def test_a_failure_ends_response_failed() -> None:
    runs = _runs()
    script = Script(PIECES[:2], fail=True)
    run = _run(runs)
    run.start(await script.generation())
    script.release(2)
    view = await run.wait()
    events = await _read(run)
    assert events[-1]["type"] == "response.failed" and view["status"] == "failed"
    assert run.error is not None and run.error.code is ErrorCode.UPSTREAM_ERROR
    assert view["output"][0]["status"] == "incomplete" and script.closed


async def test_the_registry_forgets_keeps_bounds_and_expires_runs() -> None:
    now = [0.0]
    runs = _runs(ttl_s=10.0, max_count=2, clock=lambda: now[0])
    foreground = _run(runs)
    background = [_run(runs, background=True) for _ in range(2)]
    with pytest.raises(SluiceError) as full:
        _run(runs, background=True)  # two background runs already running
    assert full.value.code is ErrorCode.OVERLOADED
    scripts = [Script(PIECES[:1]) for _ in range(3)]
    for run, script in zip([foreground, *background], scripts, strict=True):
        run.start(await script.generation())
        script.release(1)
        await run.wait()
    assert runs.get(foreground.id, "k") is None  # nobody can resume it: forgotten
    assert runs.get(background[0].id, "k") is background[0] and runs.get(background[0].id, "x") is None
    now[0] = 5.0
    late = _run(runs, background=True)
    late_script = Script(PIECES[:1])
    late.start(await late_script.generation())
    late_script.release(1)
    await late.wait()
    assert runs.get(background[0].id, "k") is None  # past max_count, the oldest went first
    now[0] = 10.5
    assert runs.get(background[1].id, "k") is None and runs.get(late.id, "k") is late
    runs.forget(late.id)
    assert runs.get(late.id, "k") is None
