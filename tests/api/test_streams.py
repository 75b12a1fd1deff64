"""`server.api.streams.EventStream`: a send without a timeout is the server's send alone; with one,
sse-starlette's timeout still applies; and sse-starlette still sends every chunk through the method
overridden (were it renamed, the override would silently stop saving anything)."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sse_starlette import EventSourceResponse
from sse_starlette.sse import SendTimeoutError

from server.api.streams import EventStream, event_stream
from server.settings import Settings


async def _body() -> AsyncIterator[bytes]:
    yield b"data: x\n\n"


async def test_without_a_send_timeout_each_message_goes_straight_to_send() -> None:
    sent: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        sent.append(message)

    response = event_stream(_body(), Settings())
    assert isinstance(response, EventStream) and response.send_timeout is None
    message = {"type": "http.response.body", "body": b"data: x\n\n", "more_body": True}
    await response._send_with_timeout(send, message)
    assert sent == [message]


async def test_with_a_send_timeout_a_stuck_send_still_times_out() -> None:
    async def stuck(message: Any) -> None:
        await asyncio.sleep(10)

    response = EventStream(_body(), send_timeout=0.05)
    with pytest.raises(SendTimeoutError):
        await asyncio.wait_for(response._send_with_timeout(stuck, {"type": "http.response.body"}), 5)


def test_sse_starlette_sends_its_chunks_through_the_overridden_method() -> None:
    assert "_send_with_timeout" in inspect.getsource(EventSourceResponse._stream_response)


async def test_with_stall_s_a_send_blocked_that_long_times_out_as_send_timeout_would() -> None:
    async def stuck(message: Any) -> None:
        await asyncio.sleep(10)

    response = EventStream(_body(), stall_s=0.05)
    assert response.send_timeout is None
    started = asyncio.get_running_loop().time()
    with pytest.raises(SendTimeoutError):
        await asyncio.wait_for(response._send_with_timeout(stuck, {"type": "http.response.body"}), 5)
    assert 0.04 <= asyncio.get_running_loop().time() - started < 2


async def test_with_stall_s_only_the_blocked_send_is_cut_and_an_idle_stream_holds_no_timer() -> None:
    sent: list[Any] = []

    async def slow(message: Any) -> None:  # slower than nothing, faster than the limit
        await asyncio.sleep(0.02)
        sent.append(message)

    async def stuck(message: Any) -> None:
        await asyncio.sleep(10)

    response = EventStream(_body(), stall_s=0.15)
    blocked = asyncio.create_task(response._send_with_timeout(stuck, {"n": 0}))
    for n in range(1, 11):  # sends go on beside the blocked one, for longer than the limit
        await response._send_with_timeout(slow, {"n": n})
    with pytest.raises(SendTimeoutError):
        await asyncio.wait_for(blocked, 5)
    assert [m["n"] for m in sent] == list(range(1, 11))
    await asyncio.sleep(0.2)  # the watchdog looks once more, finds no send, and stays off
    assert response._watchdog is None and not response._sending


async def test_with_stall_s_a_cancellation_from_outside_stays_a_cancellation() -> None:
    async def stuck(message: Any) -> None:
        await asyncio.sleep(10)

    response = EventStream(_body(), stall_s=5.0)
    task = asyncio.create_task(response._send_with_timeout(stuck, {"type": "http.response.body"}))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not response._sending
