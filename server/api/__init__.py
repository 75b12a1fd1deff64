"""The plain HTTP APIs and the SSE session transport, installed on the app by `install`.

`install(app)` adds, to an app made by `server.app.create_app`:

- the SSE session transport (`server.sse`): ``/v1/sessions``, its events stream and messages;
- the seed-compatible API (`server.api.seed`): ``/api/v1/*``, with the batch job store;
- the OpenAI-compatible API (`server.api.openai`): ``/v1/chat/completions``, ``/v1/embeddings``,
  ``/v1/models``;
- the Ollama-compatible API (`server.api.ollama`): ``/api/chat``, ``/api/generate``,
  ``/api/embed``, ``/api/tags``, ``/api/version``;
- the contract files (`server.api.contract`): ``/schema.json`` and ``/asyncapi.json``.

Everything reaches the server's one dispatcher, session registry, auth, limits and metrics
through `server.services.services_of`; `install` only adds routes, the batch job store
(``app.state.sluice_tasks``) and a lifespan step that cancels its jobs at shutdown.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI

from server.api import contract, tickets
from server.api.compat import ollama, openai, seed
from server.api.tasks import TaskStore
from server.transports import sse

__all__ = ["install"]


def install(app: FastAPI) -> None:
    """Add the SSE transport, the plain HTTP APIs and the contract files to ``app`` (once)."""
    if getattr(app.state, "sluice_tasks", None) is not None:
        raise RuntimeError("server.api.install was already called on this app")
    store = TaskStore()
    app.state.sluice_tasks = store
    app.include_router(sse.router)
    app.include_router(seed.router)
    app.include_router(openai.router)
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
