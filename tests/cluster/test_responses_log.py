"""The background responses' event log in a real redis-server (`server.api.compat.responses_log`):
mirrored in order and read back after a sequence number, a batch written twice (a retry after a
lost reply) kept once, a list with a gap refused, and a reader following it live until the end."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from server.api.compat.responses_log import SharedEventLog
from server.cluster.redis import RedisStore
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def shared(store: RedisStore) -> SharedEventLog:
    """The log on the cluster tests' Redis (emptied before each test)."""
    return SharedEventLog(store, ttl_s=60, poll_s=0.01, idle_s=1.0)


def _event(n: int) -> dict[str, Any]:
    return {"type": "response.output_text.delta", "sequence_number": n, "delta": f"p{n} "}


async def _read(shared: SharedEventLog, after: int = -1) -> list[dict[str, Any]]:
    return [event async for event in shared.events("resp_x", after)]


async def test_mirrored_in_order_and_read_after_n_live_until_the_end(shared: SharedEventLog) -> None:
    mirror = shared.mirror("resp_x")
    reader = asyncio.create_task(_read(shared, after=1))
    for n in range(5):
        mirror.add(_event(n))
        await asyncio.sleep(0.005)
    mirror.end()
    events = await asyncio.wait_for(reader, 5)
    assert events == [_event(n) for n in range(2, 5)]
    assert await _read(shared) == [_event(n) for n in range(5)] and await shared.exists("resp_x")
    await shared.delete("resp_x")
    assert not await shared.exists("resp_x")


async def test_a_repeated_batch_is_kept_once_and_a_gap_is_refused(
    shared: SharedEventLog, redis_server: RedisServer
) -> None:
    key = "sluice:response-events:resp_x"
    batch = [b'{"type":"a","sequence_number":0}', b'{"type":"b","sequence_number":1}']
    assert await shared.append(keys=[key], args=[60_000, 0, *batch]) == 0
    assert await shared.append(keys=[key], args=[60_000, 0, *batch]) == 2  # the retry: already there
    assert int(redis_server.command("LLEN", key)) == 2
    assert await shared.append(keys=[key], args=[60_000, 5, b"{}"]) == -1  # would leave a gap
    assert int(redis_server.command("LLEN", key)) == 2
