"""The plain HTTP APIs (no session), installed on the app by `install`.

`install(app)` adds, to an app made by `server.app.create_app`:

- the seed-compatible API (`server.api.compat.seed`): ``/api/v1/*``, with the batch job store;
- the OpenAI-compatible API (`server.api.compat.openai`): ``/v1/chat/completions``,
  ``/v1/embeddings``, ``/v1/models``;
- the OpenAI Responses API (`server.api.compat.responses`): ``/v1/responses`` and the stored
  responses (their store is made on first use, ``app.state.sluice_responses``), and its WebSocket
  mode at ``GET /v1/responses`` with Upgrade (`server.api.compat.responses_socket`);
- the Ollama-compatible API (`server.api.compat.ollama`): ``/api/chat``, ``/api/generate``,
  ``/api/embed``, ``/api/tags``, ``/api/version`` and the rest of Ollama's ``/api/*``;
- ``POST /v1/tickets`` (`server.api.tickets`) and the contract files (`server.api.contract`):
  ``/schema.json`` and ``/asyncapi.json``.

The session transports are not here: `server.app` mounts `server.transports`, which use this
package's error shapes and routers, never the other way round.

Everything reaches the server's one dispatcher, session registry, auth, limits and metrics
through `server.services.services_of`; `install` only adds routes, the batch job store
(``app.state.sluice_tasks``) and a lifespan step that cancels its jobs at shutdown.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from starlette.routing import WebSocketRoute

from server.api import contract, tickets
from server.api.compat import ollama, openai, responses, responses_socket, seed
from server.api.tasks import TaskStore

__all__ = ["install"]


def install(app: FastAPI) -> None:
    """Add the plain HTTP APIs, the tickets route and the contract files to ``app`` (once)."""
    if getattr(app.state, "sluice_tasks", None) is not None:
        raise RuntimeError("server.api.mount.install was already called on this app")
    store = TaskStore()
    app.state.sluice_tasks = store
    app.include_router(seed.router)
    app.include_router(openai.router)
    app.include_router(responses.router)
    socket = responses_socket.responses_socket
    app.router.routes.append(WebSocketRoute("/v1/responses", socket, name="responses_socket"))
    for router in ollama.routers:
        app.include_router(router)
    app.include_router(contract.router)
    app.include_router(tickets.router)
    _close_on_shutdown(app, store)


def _close_on_shutdown(app: FastAPI, store: TaskStore) -> None:
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(owner: Any) -> AsyncIterator[Any]:
        async with inner(owner) as state:
            try:
                yield state
            finally:
                await store.close()

    app.router.lifespan_context = lifespan
