"""The OpenAI Responses API over HTTP: ``POST /v1/responses`` (whole, streamed as server-sent
events, or in the background), and the stored responses: ``GET /v1/responses/{id}`` (also as a
stream resumed after ``starting_after``), ``POST /v1/responses/{id}/cancel``, ``DELETE
/v1/responses/{id}``, ``GET /v1/responses/{id}/input_items``.

Every response is a `ResponseRun` (`server.api.compat.responses_run`): this module parses the
request (`parse_body`), starts the run, and writes its events as server-sent events (``event:``
the type, ``data:`` the event) or waits for its final Response object; it produces no event itself.
A streamed response that is not background is cancelled when its client leaves (stored
``cancelled`` with its text so far); a background one runs to its end with no client, and is read
again from its own event log by ``GET ?stream=true&starting_after=N``. A stored response belongs to
the key that made it (any other key is told it does not exist). In cluster mode the store is the
cluster's Redis, so every node can retrieve, list, chain and delete a response; a background
run's events are mirrored there too, so any node resumes it, and a cancel on another node is sent
to the node running it (`server.api.compat.responses_log`); ``GET`` there shows its output so far
from that log, and one whose node died is settled ``failed`` by whoever finds it so (`Orphans`).
A stream this node cannot give whole is refused with a 409, never answered in part.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any, Final

import orjson
from fastapi import Path, Query, Request
from fastapi.responses import Response
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import HTTPConnection

from protocol.errors import ErrorCode
from server.api import calls
from server.api.compat.openai_chat import refuse
from server.api.compat.responses_log import (
    Orphans,
    SharedEventLog,
    answer_cancels,
    cancel_elsewhere,
    settle_orphans_of_dead_nodes,
)
from server.api.compat.responses_model import ResponsesRequest
from server.api.compat.responses_run import ResponseRun, ResponseRuns, start_run
from server.api.compat.responses_store import (
    MemoryResponseStore,
    RedisResponseStore,
    ResponseStore,
    StoredResponse,
)
from server.api.errors import Family, FieldError, StatusError, field_of, json_response, validation_errors
from server.api.routing import api_router, caller_key, error_model
from server.api.streams import event_stream
from server.services import Services, services_of

__all__ = ["parse_body", "router", "runs_for", "runs_of", "sse"]

_ERRORS: Final[dict[int | str, dict[str, Any]]] = {
    status: {"model": error_model(Family.OPENAI)} for status in (400, 401, 404, 409, 429, 503)
}
_BODY_DOC: Final[dict[str, Any]] = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": ResponsesRequest.model_json_schema(by_alias=True)}},
    }
}
ResponseId = Annotated[str, Path(max_length=128)]

router = api_router(Family.OPENAI, prefix="/v1", tags=["OpenAI Responses API"], responses=_ERRORS)


def runs_of(connection: HTTPConnection) -> ResponseRuns:
    """The app's response runs and their store (made on first use: Redis in cluster mode)."""
    return runs_for(connection.app)


def runs_for(app: Starlette) -> ResponseRuns:
    """`runs_of` for ``app`` itself (its lifespan makes them at once in cluster mode, so that this
    node settles the responses of the dead nodes it reaps)."""
    state = app.state
    runs: ResponseRuns | None = getattr(state, "sluice_responses", None)
    if runs is None:
        services = state.sluice
        assert isinstance(services, Services)
        settings = services.settings
        store: ResponseStore
        if services.cluster is not None:
            store = RedisResponseStore(
                services.cluster.store, ttl_s=settings.responses_ttl_s, max_count=settings.responses_max
            )
        else:
            store = MemoryResponseStore(ttl_s=settings.responses_ttl_s, max_count=settings.responses_max)
        shared = None
        if services.cluster is not None:
            shared = SharedEventLog(services.cluster.store, ttl_s=settings.responses_ttl_s)
        runs = ResponseRuns(
            store, ttl_s=settings.responses_ttl_s, max_count=settings.responses_max, shared=shared
        )
        if services.cluster is not None and shared is not None:
            node = services.cluster.node
            runs.node_id = node.id
            answer_cancels(node, _canceller(runs))
            runs.orphans = Orphans(shared, store, node)
            settle_orphans_of_dead_nodes(node, runs.orphans)
        services.drainer.watch(runs)  # drained with the sessions on SIGTERM
        state.sluice_responses = runs
    return runs


def parse_body(raw: object) -> ResponsesRequest:
    """A request body (already decoded JSON); a 400 in OpenAI's shape naming the first bad field."""
    if not isinstance(raw, dict):
        raise FieldError("body", ErrorCode.INVALID_REQUEST, "the body must be a JSON object")
    try:
        return ResponsesRequest.model_validate(raw)
    except ValidationError as exc:
        first = validation_errors(exc)[0]
        field = field_of(tuple(first.get("loc", ())))
        reason = str(first.get("msg", "invalid value")).removeprefix("Value error, ")[:200]
        raise FieldError(field, ErrorCode.INVALID_REQUEST, f"invalid field {field!r}: {reason}") from None


async def _body(request: Request) -> ResponsesRequest:
    try:
        raw = orjson.loads(await request.body())
    except orjson.JSONDecodeError:
        raise FieldError("body", ErrorCode.INVALID_REQUEST, "the body is not valid JSON") from None
    return parse_body(raw)


async def sse(run: ResponseRun, after: int = -1, *, owned: bool = False) -> AsyncIterator[bytes]:
    """``run``'s events after ``after`` as server-sent events; an ``owned`` run (the stream of a
    response that is not background) is stopped when the reader leaves before its end."""
    try:
        async for batch in run.batches(after):
            yield b"".join(map(_sse_event, batch))  # one write for whatever was logged meanwhile
    finally:
        if owned:
            run.stop()


def _sse_event(event: dict[str, Any]) -> bytes:
    kind: str = event["type"]
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"


async def _sse_of(events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    async for event in events:
        yield _sse_event(event)


@router.post(
    "/responses",
    summary="Create a response (whole, streamed with stream: true, or with background: true)",
    openapi_extra=_BODY_DOC,
)
async def create_response(request: Request) -> Response:
    body = await _body(request)
    services = services_of(request)
    run = await calls.run_or_cancel(request, start_run(services, runs_of(request), caller_key(request), body))
    if body.stream:
        return event_stream(sse(run, owned=not run.background), services.settings)
    if run.background:
        return json_response(run.view)
    try:
        view = await calls.run_or_cancel(request, run.wait())
    except calls.ClientGone:
        run.stop()
        raise
    if run.error is not None:
        raise run.error
    return json_response(view)


async def _stored(request: Request, response_id: str) -> StoredResponse:
    stored = await runs_of(request).store.get(response_id, caller_key(request))
    if stored is None:
        raise StatusError(404, ErrorCode.INVALID_REQUEST, f"no response {response_id!r} (unknown or expired)")
    return stored


async def _found(request: Request, response_id: str) -> tuple[ResponseRun | None, dict[str, Any]]:
    """This node's run of ``response_id`` (None when it is not here) and its Response object now;
    a 404 when the caller cannot see it."""
    runs = runs_of(request)
    run = runs.get(response_id, caller_key(request))
    if run is not None:
        return run, run.current()
    stored = await _stored(request, response_id)
    if runs.orphans is None:
        return None, stored.response
    return None, await runs.orphans.current(stored)  # run elsewhere: with its output so far


@router.get("/responses/{response_id}", summary="A stored response (or its events, with stream=true)")
async def get_response(
    request: Request,
    response_id: ResponseId,
    stream: Annotated[bool, Query()] = False,
    starting_after: Annotated[int | None, Query(ge=-1)] = None,
) -> Response:
    if not stream:
        if starting_after is not None:
            raise refuse("starting_after", "needs stream=true")
        return json_response((await _found(request, response_id))[1])
    after = -1 if starting_after is None else starting_after
    settings = services_of(request).settings
    run, view = await _found(request, response_id)
    if not view.get("background"):
        raise refuse("stream", "only background responses can be streamed")
    if run is not None:
        return event_stream(sse(run, after), settings)
    # Run by another node (or forgotten here): its events are in Redis, in cluster mode.
    shared = runs_of(request).shared
    running = view["status"] in ("queued", "in_progress")
    if shared is None or not (running or await shared.exists(response_id)):
        raise StatusError(
            409, ErrorCode.INVALID_REQUEST, f"the events of response {response_id!r} are no longer kept"
        )
    orphans, key_id = runs_of(request).orphans, caller_key(request)

    async def check() -> None:  # nothing new for a while: is its node still alive?
        if orphans is not None:
            await orphans.check(response_id, key_id)

    return event_stream(_sse_of(shared.events(response_id, after, on_quiet=check)), settings)


@router.post("/responses/{response_id}/cancel", summary="Cancel a background response")
async def cancel_response(request: Request, response_id: ResponseId) -> Response:
    # Cancelling one that has ended answers it as it is (OpenAI's cancel is idempotent).
    runs, key_id = runs_of(request), caller_key(request)
    run = runs.get(response_id, key_id)
    view = run.view if run is not None else (await _stored(request, response_id)).response
    if not view.get("background"):
        raise refuse("response_id", "only background responses can be cancelled")
    if run is not None:
        return json_response(await run.cancel())
    for _ in range(2):  # running on another node: sent there; ended meanwhile: as it is now
        stored = await _stored(request, response_id)
        if runs.orphans is not None:  # its node died: settled (failed) here
            stored.response = await runs.orphans.current(stored)
        if stored.response["status"] not in ("queued", "in_progress"):
            return json_response(stored.response)
        cluster = services_of(request).cluster
        if cluster is not None and stored.node and stored.node != runs.node_id:
            final = await cancel_elsewhere(cluster.node, stored.node, response_id, key_id)
            if final is not None:
                return json_response(final)
    raise StatusError(
        409, ErrorCode.INVALID_REQUEST, f"response {response_id!r} is running on no node that answers"
    )


def _canceller(runs: ResponseRuns) -> Callable[[str, str], Awaitable[dict[str, Any] | None]]:
    """How this node cancels its runs for other nodes (`answer_cancels`)."""

    async def cancel(response_id: str, key_id: str) -> dict[str, Any] | None:
        run = runs.get(response_id, key_id)
        return await run.cancel() if run is not None and run.background else None

    return cancel


@router.delete("/responses/{response_id}", summary="Delete a stored response")
async def delete_response(request: Request, response_id: ResponseId) -> Response:
    runs, key_id = runs_of(request), caller_key(request)
    await _stored(request, response_id)
    run = runs.get(response_id, key_id)
    if run is not None:
        await run.cancel()
        runs.forget(response_id)
    await runs.store.delete(response_id, key_id)
    if runs.shared is not None:
        await runs.shared.delete(response_id)
    return json_response({"id": response_id, "object": "response.deleted", "deleted": True})


@router.get("/responses/{response_id}/input_items", summary="The input items of a stored response")
async def input_items(
    request: Request,
    response_id: ResponseId,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    order: Annotated[str, Query(pattern="^(asc|desc)$")] = "desc",
    after: Annotated[str | None, Query(max_length=256)] = None,
) -> Response:
    items = list((await _stored(request, response_id)).input_items)
    if order == "desc":
        items.reverse()
    if after is not None:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise refuse("after", f"no input item {after!r} in this response")
        items = items[ids.index(after) + 1 :]
    page = items[:limit]
    first, last = (page[0]["id"], page[-1]["id"]) if page else (None, None)
    return json_response(
        {"object": "list", "data": page, "first_id": first, "last_id": last, "has_more": len(items) > limit}
    )
