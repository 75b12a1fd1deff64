"""The batch job store: bounded, expiring, owned by the key that submitted each job."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from protocol.errors import ErrorCode, SluiceError
from server.api.tasks import EmbeddingBatch, Task, TaskStore


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def _vectors(task: Task) -> EmbeddingBatch:
    await asyncio.sleep(0)
    task.done = task.total
    return EmbeddingBatch(model="m", vectors=np.ones((task.total, 3), dtype=np.float32))


async def _settle(store: TaskStore) -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_a_job_runs_to_completion_and_expires_after_the_ttl() -> None:
    clock = Clock()
    store = TaskStore(max_tasks=4, max_texts=100, ttl_s=10.0, clock=clock)
    task = store.submit("k", 2, _vectors)
    assert task.status == "pending"
    await _settle(store)
    view = store.get(task.id, "k")
    assert view is task and task.status == "completed"
    assert task.view()["result"] == {"embeddings": [[1.0] * 3] * 2, "model": "m", "dimensions": 3}
    assert store.get(task.id, "someone else") is None
    clock.now += 9.9
    assert store.get(task.id, "k") is task
    clock.now += 0.1
    assert store.get(task.id, "k") is None
    assert len(store) == 0 and store.held_texts == 0


async def test_a_failed_job_keeps_its_typed_error() -> None:
    store = TaskStore()

    async def fails(task: Task) -> EmbeddingBatch:
        raise SluiceError(ErrorCode.MODEL_NOT_FOUND, "no such model")

    async def crashes(task: Task) -> EmbeddingBatch:
        raise RuntimeError("secret internals")

    failed = store.submit("k", 1, fails)
    crashed = store.submit("k", 1, crashes)
    await _settle(store)
    assert failed.view()["error"] == {
        "code": "model_not_found",
        "message": "no such model",
        "retryable": False,
    }
    assert crashed.view()["error"]["code"] == "internal"
    assert "secret" not in str(crashed.view())


async def test_the_store_is_bounded_in_jobs_and_texts() -> None:
    clock = Clock()
    store = TaskStore(max_tasks=2, max_texts=10, ttl_s=5.0, clock=clock)
    store.submit("k", 4, _vectors)
    with pytest.raises(SluiceError) as too_big:
        store.submit("k", 11, _vectors)
    assert too_big.value.code is ErrorCode.INVALID_REQUEST
    with pytest.raises(SluiceError) as no_room:
        store.submit("k", 7, _vectors)
    assert no_room.value.code is ErrorCode.OVERLOADED and no_room.value.retry_after_ms
    store.submit("k", 6, _vectors)
    with pytest.raises(SluiceError):
        store.submit("k", 1, _vectors)
    await _settle(store)
    clock.now += 5.0  # both ended: they expire, and make room
    assert store.submit("k", 10, _vectors).status == "pending"
    await store.close()


async def test_close_cancels_running_jobs() -> None:
    store = TaskStore()
    started = asyncio.Event()

    async def forever(task: Task) -> EmbeddingBatch:
        started.set()
        await asyncio.Event().wait()
        raise AssertionError

    task = store.submit("k", 1, forever)
    await started.wait()
    await store.close()
    assert task.status == "failed" and task.error is not None
    assert task.error.code is ErrorCode.SHUTTING_DOWN
