"""Nodes against a real redis-server: control messages in order, calls answered, feeds delivered
only after the subscription is confirmed, a node that stops is found dead and handed over once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from server.cluster.node import Node
from server.cluster.redis import RedisStore
from tests.support.redis_server import RedisServer


@pytest.fixture
async def second(store: RedisStore, redis_server: RedisServer) -> AsyncIterator[RedisStore]:
    other = RedisStore(redis_server.url)
    await other.start()
    try:
        yield other
    finally:
        await other.close()


async def _started(store: RedisStore, node_id: str, **kwargs: Any) -> Node:
    node = Node(store, node_id, **kwargs)
    await node.start()
    return node


async def test_control_messages_arrive_in_order_and_calls_get_answers(
    store: RedisStore, second: RedisStore
) -> None:
    a = await _started(store, "n_a")
    b = await _started(second, "n_b")
    seen: list[int] = []

    async def on_control(message: dict[str, Any]) -> object:
        if message["op"] == "add":
            await asyncio.sleep(0.001 * (message["n"] % 3))  # slower handlers must not reorder
            seen.append(message["n"])
            return None
        return {"sum": sum(seen)}

    b.on_control = on_control
    try:
        for n in range(50):
            assert await a.send("n_b", {"op": "add", "n": n})
        assert await a.call("n_b", {"op": "sum"}) == {"sum": sum(range(50))}
        assert seen == list(range(50))
        assert not await a.send("n_nobody", {"op": "add", "n": 1})
    finally:
        await a.close()
        await b.close()


async def test_a_feed_gets_everything_published_after_subscribe_returns(
    store: RedisStore, second: RedisStore
) -> None:
    a = await _started(store, "n_a")
    got: list[bytes] = []
    try:
        await a.subscribe("sluice:{s_x}:feed", got.append)
        for n in range(100):
            await second.client.publish("sluice:{s_x}:feed", str(n))
        for _ in range(100):
            if len(got) == 100:
                break
            await asyncio.sleep(0.02)
        assert got == [str(n).encode() for n in range(100)]
        await a.unsubscribe("sluice:{s_x}:feed")
        await second.client.publish("sluice:{s_x}:feed", "late")
        await asyncio.sleep(0.1)
        assert len(got) == 100
    finally:
        await a.close()


async def test_a_node_that_stops_beating_is_handed_to_one_survivor(
    store: RedisStore, second: RedisStore, redis_server: RedisServer
) -> None:
    dead: list[tuple[str, str]] = []
    a = await _started(store, "n_a", lease_s=1.0, beat_s=0.2)
    b = await _started(second, "n_b", lease_s=1.0, beat_s=0.2)
    third = RedisStore(redis_server.url)
    await third.start()
    c = await _started(third, "n_c", lease_s=1.0, beat_s=0.2)

    async def on_dead_for(survivor: str) -> Any:
        async def on_dead(node_id: str) -> None:
            dead.append((survivor, node_id))

        return on_dead

    a.on_dead = await on_dead_for("n_a")
    b.on_dead = await on_dead_for("n_b")
    try:
        await asyncio.sleep(0.5)
        for task in c._tasks:  # a SIGKILL, seen from Redis: the beat stops, nothing is cleaned up
            task.cancel()
        loop = asyncio.get_running_loop()
        stopped = loop.time()
        for _ in range(100):
            if dead:
                break
            await asyncio.sleep(0.05)
        assert loop.time() - stopped < 2.5
        await asyncio.sleep(0.5)
        assert len(dead) == 1 and dead[0][1] == "n_c"
        assert await a.alive("n_b") and not await a.alive("n_c")
    finally:
        await a.close()
        await b.close()
        await third.close()


async def test_a_pubsub_connection_gone_silent_is_cut_and_the_feeds_come_back(
    store: RedisStore, second: RedisStore, redis_server: RedisServer
) -> None:
    a = await _started(store, "n_a", lease_s=0.4, beat_s=0.1)
    reconnects: list[int] = []
    a.on_reconnect = lambda: reconnects.append(1)
    got: list[bytes] = []
    try:
        await a.subscribe("sluice:{s_x}:feed", got.append)
        await asyncio.sleep(0.3)
        before = len(reconnects)
        # Redis answers nobody for a while: the node's reader hears nothing, not even its pongs.
        redis_server.command("CLIENT", "PAUSE", "1200", "ALL")
        for _ in range(100):
            if len(reconnects) > before:
                break
            await asyncio.sleep(0.05)
        assert len(reconnects) > before
        for _ in range(100):
            await second.client.publish("sluice:{s_x}:feed", "after")
            if got:
                break
            await asyncio.sleep(0.05)
        assert got and set(got) == {b"after"}
    finally:
        await a.close()


class _CancelComesOutAsRedisError:
    """A heartbeat pipeline whose `execute` waits, and answers a cancel the way redis-py can when
    one lands mid-command: with its own ConnectionError instead of the CancelledError."""

    def __init__(self, entered: asyncio.Event) -> None:
        self.entered = entered

    async def __aenter__(self) -> _CancelComesOutAsRedisError:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def set(self, *args: object, **kwargs: object) -> None:
        return None

    def zadd(self, *args: object, **kwargs: object) -> None:
        return None

    async def execute(self) -> None:
        self.entered.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            raise RedisConnectionError("Connection closed by server.") from None


async def test_a_node_closes_when_a_cancel_comes_out_of_redis_as_another_error(store: RedisStore) -> None:
    node = await _started(store, "n_a", lease_s=1.0, beat_s=0.05)
    entered = asyncio.Event()
    real = store.client.pipeline
    store.client.pipeline = lambda **_: _CancelComesOutAsRedisError(entered)  # type: ignore[assignment,method-assign]
    try:
        await asyncio.wait_for(entered.wait(), 5)
    finally:
        store.client.pipeline = real  # type: ignore[method-assign]
    # The heartbeat is inside `execute`; the close cancels it there. Taking that error for one
    # more Redis failure would beat on forever, and the close would wait for it forever.
    closing = asyncio.ensure_future(node.close())
    done, _ = await asyncio.wait({closing}, timeout=5)
    assert closing in done, "the node's close waited on a heartbeat that never stopped"
    await closing
