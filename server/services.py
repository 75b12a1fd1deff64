"""The objects one app is made of, wired once by `server.app.create_app` and shared by transports.

Every transport and route reaches them through `services_of(request_or_websocket)`: the model
registry, the dispatcher (the one way to run a request), the session registry, auth, limits,
metrics and the drain state, plus `Services.welcome` (the first message of every session
connection, whatever the transport). Nothing here does I/O or holds per-connection state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Protocol

from starlette.requests import HTTPConnection

from protocol.messages import Limits, Models, ServerInfo, Welcome
from server.auth import Authenticator
from server.dispatcher import Dispatcher, ModelSource
from server.draining import DrainState
from server.metrics import Metrics
from server.ratelimit import RateLimiter
from server.seam import Sessions
from server.settings import Settings
from server.shutdown import Drainer

if TYPE_CHECKING:
    from server.cluster.mode import ClusterMode

__all__ = ["SERVER_VERSION", "ModelBackends", "Services", "services_of"]


def _version() -> str:
    try:
        return version("sluice")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0.0.0"


SERVER_VERSION = _version()


class ModelBackends(ModelSource, Protocol):
    """What the app needs of `server.backends.registry.ModelRegistry` (tests pass fakes)."""

    async def start(self) -> None: ...
    async def close(self) -> None: ...
    def models(self) -> dict[str, list[str]]: ...
    def status(self) -> dict[str, object]: ...
    @property
    def ready(self) -> bool: ...


@dataclass(slots=True)
class Services:
    settings: Settings
    registry: ModelBackends
    auth: Authenticator
    limiter: RateLimiter
    metrics: Metrics
    dispatcher: Dispatcher
    sessions: Sessions
    drain: DrainState
    drainer: Drainer
    # Cluster mode's store and node (``SLUICE_REDIS_URL``); None on a single node.
    cluster: ClusterMode | None = None
    limits: Limits = field(init=False)

    def __post_init__(self) -> None:
        settings = self.settings
        self.limits = Limits(
            max_message_bytes=settings.max_message_bytes,
            max_inflight=settings.max_inflight,
            replay_events=settings.replay_events,
            replay_bytes=settings.replay_bytes,
            session_ttl_s=settings.session_ttl_s,
            max_buffered_bytes=settings.outbound_hard_bytes,
            **self.limiter.limits(),
        )

    @property
    def draining(self) -> bool:
        return self.drain.active

    def welcome(self, session_id: str, resumed: bool, last_seq: int) -> Welcome:
        """The first message of a session connection (`Sessions.connect` calls it)."""
        return Welcome(
            session=session_id,
            resumed=resumed,
            last_seq=last_seq,
            server=ServerInfo(name="sluice", version=SERVER_VERSION),
            limits=self.limits,
            models=Models(**self.registry.models()),
        )


def services_of(connection: HTTPConnection) -> Services:
    """The `Services` of the app serving this request or WebSocket."""
    services = connection.app.state.sluice
    assert isinstance(services, Services)
    return services
