"""Cluster nodes inside the test process: each a `ClusterSessionRegistry` with its own Redis
connections, `Node` and dispatcher over the fake backends, all sharing one real redis-server."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from redis.asyncio import Redis

from protocol.codec import encode
from protocol.messages import Limits, Welcome
from protocol.session import SessionLimits
from server.cluster.node import Node
from server.cluster.redis import RedisStore
from server.cluster.sessions import ClusterSessionRegistry
from server.dispatcher import Dispatcher
from server.metrics import Metrics
from server.outbox import Outbox
from server.ratelimit import RateLimiter
from server.settings import Settings
from tests.server import fakes
from tests.server.fakes import FakeRegistry
from tests.support.server import free_port

Event = dict[str, Any]


_LIMITS = Limits(max_message_bytes=1 << 20, max_inflight=8, replay_events=4096, session_ttl_s=60)


def welcome(session_id: str, resumed: bool, last_seq: int) -> Welcome:
    return fakes.welcome(session_id, resumed, last_seq, _LIMITS)


def outbox() -> Outbox:
    return Outbox(encode=encode, soft_bytes=1 << 20, hard_bytes=1 << 24)


@dataclass
class InProcessNode:
    store: RedisStore
    node: Node
    sessions: ClusterSessionRegistry
    backends: FakeRegistry

    async def close(self) -> None:
        await self.sessions.close()
        await self.node.close()
        await self.store.close()


async def start_node(
    url: str,
    node_id: str,
    backends: FakeRegistry,
    *,
    lease_s: float = 1.0,
    ttl_s: float = 60.0,
    log_budget_bytes: int = 0,
) -> InProcessNode:
    store = RedisStore(url)
    await store.start()
    node = Node(store, node_id, lease_s=lease_s, beat_s=lease_s / 5)
    settings = Settings()
    limiter = RateLimiter(settings)
    metrics = Metrics()
    sessions = ClusterSessionRegistry(
        limits=SessionLimits(max_inflight=8, replay_events=4096),
        ttl_s=ttl_s,
        dispatcher=Dispatcher(backends, limiter=limiter, metrics=metrics),
        limiter=limiter,
        metrics=metrics,
        store=store,
        node=node,
        log_budget_bytes=log_budget_bytes,
    )
    await node.start()
    sessions.start_sweeper()
    return InProcessNode(store, node, sessions, backends)


async def kill(node: InProcessNode) -> None:
    """What a SIGKILL looks like from Redis and the other nodes: every connection of the node
    drops and it never writes, beats or answers again (its requests stop with it)."""
    for task in list(node.node._tasks):
        task.cancel()
    for session in list(node.sessions):
        if session.runtime is not None:
            for work in list(session.runtime._work.values()):
                work.task.cancel()
    await node.store.client.aclose()
    node.store.client = Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=0.2)
    node.sessions.close = _nothing  # type: ignore[method-assign]
    node.node.close = _nothing  # type: ignore[method-assign]


async def _nothing() -> None:
    return None


async def collect(box: Outbox, until: Callable[[list[Event]], bool], within: float = 10.0) -> list[Event]:
    """Frames from ``box`` (decoded) until ``until(events)`` holds or the outbox closes."""
    events: list[Event] = []
    async with asyncio.timeout(within):
        while not until(events):
            frame = await box.next_frame()
            if frame is None:
                break
            events.append(orjson.loads(frame))
    return events


def terminal(request_id: str) -> Callable[[list[Event]], bool]:
    return lambda events: any(
        e.get("id") == request_id and e["type"] in ("done", "error", "embedding", "classification")
        for e in events
    )
