"""Cluster mode as one server wires it: the Redis store, this node, the cluster session registry.

`ClusterMode` is built by `server.app.build_services` when ``SLUICE_REDIS_URL`` is set (and only
then is anything of `server.cluster` imported). The app starts it before serving and closes it
after the sessions (`start`, `close`); ``/ready`` asks `ready` and reports `status`, so a node
that cannot reach Redis says 503 and names the store. It holds no session state of its own.
"""

from __future__ import annotations

import os

from protocol.session import SessionLimits
from server.cluster.node import Node
from server.cluster.redis import RedisStore
from server.cluster.sessions import ClusterSessionRegistry
from server.dispatcher import Dispatcher
from server.metrics import Metrics
from server.ratelimit import RateLimiter
from server.settings import Settings

__all__ = ["ClusterMode"]


class ClusterMode:
    """The cluster-mode parts of one server (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        *,
        limits: SessionLimits,
        dispatcher: Dispatcher,
        limiter: RateLimiter,
        metrics: Metrics,
    ) -> None:
        self.store = RedisStore(settings.redis_url)
        node_id = settings.node_id
        if node_id and settings.workers > 1:
            node_id = f"{node_id}-{os.getpid()}"  # workers share the settings, not the id
        self.node = Node(self.store, node_id)
        self.sessions = ClusterSessionRegistry(
            limits=limits,
            ttl_s=settings.session_ttl_s,
            dispatcher=dispatcher,
            limiter=limiter,
            metrics=metrics,
            store=self.store,
            node=self.node,
            log_budget_bytes=settings.max_log_bytes,
        )

    async def start(self) -> None:
        """Connect (a store that is down now is retried in the background: the node comes up
        not ready, and becomes ready once Redis answers)."""
        await self.store.start()
        await self.node.start()

    async def close(self) -> None:
        """After `ClusterSessionRegistry.close`: leave the cluster and disconnect."""
        await self.node.close()
        await self.store.close()

    @property
    def ready(self) -> bool:
        return self.store.healthy

    def status(self) -> dict[str, object]:
        return {"node": self.node.id, "url": _redacted(self.store.url), **self.store.status()}


def _redacted(url: str) -> str:
    """The URL without a password, for ``/ready``."""
    scheme, sep, rest = url.partition("://")
    if "@" not in rest:
        return url
    return f"{scheme}{sep}***@{rest.rpartition('@')[2]}"
