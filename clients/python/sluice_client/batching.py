"""Long input lists as several requests in flight together, each retried on retryable errors.

`in_batches` cuts a list into chunks, runs at most ``concurrency`` of them at once over the one
session, reports each finished chunk (for a progress bar) and returns the results in input order;
the first failure cancels the rest. `with_retries` repeats one call after a retryable
`SluiceError` (rate limits, overload, a session lost on reconnect), honouring ``retry_after_ms``.
Only for idempotent requests (``embed``, ``classify``): a generation is never retried here.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from protocol.errors import SluiceError

__all__ = ["in_batches", "with_retries"]

T = TypeVar("T")
S = TypeVar("S")


async def with_retries(
    call: Callable[[], Awaitable[T]], *, attempts: int = 3, base_delay_s: float = 0.25
) -> T:
    for attempt in range(attempts):
        try:
            return await call()
        except SluiceError as exc:
            if not exc.retryable or attempt == attempts - 1:
                raise
            delay = exc.retry_after_ms / 1000 if exc.retry_after_ms else base_delay_s * 2**attempt
            await asyncio.sleep(delay * (1.0 + 0.2 * random.random()))
    raise AssertionError("unreachable")


async def in_batches(
    items: Sequence[S],
    *,
    batch_size: int,
    concurrency: int,
    run: Callable[[list[S]], Awaitable[T]],
    on_done: Callable[[int], object] | None = None,
) -> list[T]:
    chunks = [list(items[start : start + batch_size]) for start in range(0, len(items), batch_size)]
    gate = asyncio.Semaphore(max(1, concurrency))

    async def one(chunk: list[S]) -> T:
        async with gate:
            result = await run(chunk)
        if on_done is not None:
            on_done(len(chunk))
        return result

    tasks = [asyncio.create_task(one(chunk)) for chunk in chunks]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]  # checked just above
        return [task.result() for task in tasks]
    finally:
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait(tasks)
