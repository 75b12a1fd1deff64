"""The Responses API's Redis store and the settling of a dead node's responses, on a real
redis-server: the store holds at most ``max_count`` responses across every node (the oldest by last
write go, their event logs with them; a rewrite counts as new, a delete frees its place), and two
nodes settling one orphaned response at once write its ``response.failed`` once."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from server.api.compat.responses_log import END, Orphans, SharedEventLog
from server.api.compat.responses_store import RedisResponseStore, StoredResponse
from server.cluster.redis import RedisStore

pytestmark = pytest.mark.timeout(30)


def _stored(response_id: str, status: str = "completed", node: str = "") -> StoredResponse:
    view = {"id": response_id, "object": "response", "status": status, "output": [], "error": None}
    return StoredResponse("key", view, [], [], node)


async def test_the_store_keeps_at_most_max_count_across_nodes(store: RedisStore) -> None:
    node_a = RedisResponseStore(store, ttl_s=60, max_count=3)
    node_b = RedisResponseStore(store, ttl_s=60, max_count=3)
    shared = SharedEventLog(store, ttl_s=60)
    mirror = shared.mirror("r0")
    mirror.add({"type": "response.created", "sequence_number": 0})
    mirror.end()
    await asyncio.sleep(0.1)
    assert await shared.exists("r0")
    for n in range(3):
        await (node_a if n % 2 else node_b).put(f"r{n}", _stored(f"r{n}"))
        await asyncio.sleep(0.002)  # distinct write times
    await node_a.put("r0", _stored("r0"))  # rewritten: now the newest
    await asyncio.sleep(0.002)
    await node_b.put("r3", _stored("r3"))  # one past the bound: r1, the oldest written, goes
    found = {n: await node_a.get(f"r{n}", "key") is not None for n in range(4)}
    assert found == {0: True, 1: False, 2: True, 3: True}
    assert await shared.exists("r0")
    assert await node_b.delete("r2", "key")
    await node_a.put("r4", _stored("r4"))  # the deleted one's place: nothing else goes
    found = {n: await node_b.get(f"r{n}", "key") is not None for n in range(5)}
    assert found == {0: True, 1: False, 2: False, 3: True, 4: True}
    await node_a.put("r5", _stored("r5"))
    assert await node_a.get("r0", "key") is None and not await shared.exists("r0")
    assert await store.client.zcard("sluice:responses") == 3


class _DeadNode:
    id = "reader"

    async def alive(self, node_id: str) -> bool:
        return False


async def test_two_nodes_settling_one_orphan_write_its_end_once(store: RedisStore) -> None:
    responses = RedisResponseStore(store, ttl_s=60, max_count=10)
    shared = SharedEventLog(store, ttl_s=60)
    mirror = shared.mirror("orphan")
    events: list[dict[str, Any]] = [
        {"type": "response.created", "sequence_number": 0, "response": {}},
        {
            "type": "response.output_item.added",
            "sequence_number": 1,
            "output_index": 0,
            "item": {"id": "msg_1", "type": "message", "status": "in_progress", "content": []},
        },
        {"type": "response.output_text.delta", "sequence_number": 2, "item_id": "msg_1", "delta": "Hel"},
        {"type": "response.output_text.delta", "sequence_number": 3, "item_id": "msg_1", "delta": "lo"},
    ]
    for event in events:
        mirror.add(event)
    await asyncio.sleep(0.1)
    await responses.put("orphan", _stored("orphan", "in_progress", node="dead"))
    orphans = [Orphans(shared, responses, _DeadNode()) for _ in range(2)]  # type: ignore[arg-type]
    views = await asyncio.gather(*(orphan.check("orphan", "key") for orphan in orphans))
    assert views == [None, None]
    raw = await store.client.lrange("sluice:response-events:orphan", 0, -1)
    assert raw[-1] == END and len(raw) == len(events) + 2
    logged = await shared.read("orphan")
    failed = logged[-1]
    assert failed["type"] == "response.failed" and failed["sequence_number"] == len(events)
    (item,) = failed["response"]["output"]
    assert item["status"] == "incomplete" and item["content"][0]["text"] == "Hello"
    after = await responses.get("orphan", "key")
    assert after is not None and after.response["status"] == "failed" and after.node == ""
    assert after.response["error"]["code"] == "server_error"
