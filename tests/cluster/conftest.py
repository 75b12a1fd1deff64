"""A real redis-server for the cluster tests: one per test module run, emptied before each test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from server.cluster.redis import RedisStore
from tests.support.redis_server import RedisServer, run_redis


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with run_redis(save="") as server:
        yield server


@pytest.fixture
async def store(redis_server: RedisServer) -> AsyncIterator[RedisStore]:
    if not redis_server.running:
        redis_server.start()
    redis_server.command("FLUSHALL")
    redis_server.command("CONFIG", "RESETSTAT")
    store = RedisStore(redis_server.url)
    await store.start()
    try:
        yield store
    finally:
        await store.close()
