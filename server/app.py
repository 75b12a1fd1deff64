"""The FastAPI application: `create_app` wires the services, routes and lifespan of one server.

The lifespan starts loading the models in the background (they load in worker threads, never on
the event loop) and returns at once, so ``/health`` answers while they load and ``/ready`` says
503 until the default models are loaded, and again while the server drains. At shutdown it
drains the sessions (a no-op when `server.shutdown.DrainingServer` already did), ends them, and
closes the backends.

Routes here: ``GET /health``, ``GET /ready``, the session transports (`server.transports`: the
WebSocket at ``/v1/ws``, SSE at ``/v1/sessions``) and ``GET /metrics``; `server.api.mount.install` adds
the plain HTTP APIs, which reach everything through `server.services.services_of`; the chat page
is served at ``/``. This module must never read the environment: a `Settings` is passed in.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.routing import WebSocketRoute

from protocol.session import SessionLimits
from server.api import mount
from server.api.compat import responses
from server.auth import Authenticator
from server.cors import PolicyCORSMiddleware
from server.dispatcher import Dispatcher
from server.draining import DrainState
from server.metrics import Metrics, metrics_router
from server.ratelimit import RateLimiter
from server.seam import Sessions
from server.services import SERVER_VERSION, ModelBackends, Services, services_of
from server.sessions import SessionRegistry
from server.settings import Settings
from server.shutdown import Drainer
from server.transports import sse, websocket

__all__ = ["build_services", "create_app"]

log = logging.getLogger("sluice.app")

# The chat page, built from clients/js/page by `npm run build` and committed.
STATIC_DIR = Path(__file__).with_name("static")


def build_services(settings: Settings, *, registry: ModelBackends | None = None) -> Services:
    """Every long-lived object of one server, wired together (no I/O happens here)."""
    if registry is None:
        from server.backends.registry import ModelRegistry  # heavy imports: only when serving

        model_registry = ModelRegistry(settings)
        registry = model_registry
    metrics = Metrics()
    _observe_batches(registry, metrics)
    limiter = RateLimiter(settings)
    drain = DrainState()
    dispatcher = Dispatcher(registry, limiter=limiter, metrics=metrics, drain=drain)
    limits = SessionLimits(
        max_inflight=settings.max_inflight,
        replay_events=settings.replay_events,
        replay_bytes=settings.replay_bytes,
    )
    cluster = None
    sessions: Sessions
    if settings.redis_url:
        from server.cluster.mode import ClusterMode  # redis is imported in cluster mode only

        cluster = ClusterMode(
            settings, limits=limits, dispatcher=dispatcher, limiter=limiter, metrics=metrics
        )
        sessions = cluster.sessions
    else:
        sessions = SessionRegistry(
            limits=limits,
            log_budget_bytes=settings.max_log_bytes,
            ttl_s=settings.session_ttl_s,
            dispatcher=dispatcher,
            limiter=limiter,
            metrics=metrics,
        )
    return Services(
        settings=settings,
        registry=registry,
        auth=Authenticator(settings),
        limiter=limiter,
        metrics=metrics,
        dispatcher=dispatcher,
        sessions=sessions,
        drain=drain,
        drainer=Drainer(sessions, drain, timeout_s=settings.drain_timeout_s),
        cluster=cluster,
    )


def create_app(settings: Settings | None = None, *, registry: ModelBackends | None = None) -> FastAPI:
    """The sluice app for ``settings`` (read from the environment when None, as `sluice serve`
    does); ``registry`` replaces the real `ModelRegistry` (tests)."""
    services = build_services(settings if settings is not None else Settings(), registry=registry)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.create_task(services.registry.start(), name="sluice model loading")
        loading.add_done_callback(_log_loading_failure)
        if services.cluster is not None:
            await services.cluster.start()
            responses.runs_for(_app)  # so that this node settles the responses of dead nodes
        services.sessions.start_sweeper()
        try:
            yield
        finally:
            await services.drainer.drain()
            await services.sessions.close()
            if services.cluster is not None:
                await services.cluster.close()
            await services.limiter.close()
            loading.cancel()
            await asyncio.gather(loading, return_exceptions=True)
            await services.registry.close()

    app = FastAPI(
        title="sluice",
        version=SERVER_VERSION,
        summary="Streaming-first realtime server for AI inference.",
        lifespan=lifespan,
    )
    app.state.sluice = services
    app.add_api_route("/health", health, methods=["GET"], tags=["operations"])
    app.add_api_route("/ready", ready, methods=["GET"], tags=["operations"])
    app.router.routes.append(WebSocketRoute("/v1/ws", websocket.session_socket, name="session_socket"))
    app.include_router(sse.router)
    app.include_router(metrics_router(services.metrics))
    mount.install(app)
    app.add_middleware(PolicyCORSMiddleware, policy=services.auth.origins)
    # Last: a mount at "/" matches every path, so anything added after it would be unreachable.
    app.mount("/", StaticFiles(directory=STATIC_DIR, html=True), name="static")
    return app


async def health() -> dict[str, str]:
    """The process is up (models may still be loading)."""
    return {"status": "ok"}


async def ready(request: Request) -> JSONResponse:
    """200 once the default models are loaded and the server is not draining; 503 otherwise.

    The body reports each backend's state, including each configured Ollama URL's reachability.
    """
    services = services_of(request)
    body = dict(services.registry.status())
    is_ready = services.registry.ready and not services.draining
    if services.cluster is not None:
        # Without the session store a node can start nothing: it says so, and which store.
        body["session_store"] = services.cluster.status()
        is_ready = is_ready and services.cluster.ready
    body["ready"] = is_ready
    body["draining"] = services.draining
    return JSONResponse(body, status_code=200 if is_ready else 503)


def _observe_batches(registry: ModelBackends, metrics: Metrics) -> None:
    observe = getattr(registry, "observe_batches", None)
    if observe is not None:
        observe(lambda record: metrics.batch_size(record.model, record.size))


def _log_loading_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("loading the models failed", exc_info=task.exception())
