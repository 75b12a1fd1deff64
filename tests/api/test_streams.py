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
