"""The OpenAI Responses API: ``POST /v1/responses`` (whole, or streamed as server-sent events),
and the stored responses: ``GET`` and ``DELETE /v1/responses/{id}``, ``GET
/v1/responses/{id}/input_items``.

A request becomes a protocol `Generate` (`server.api.compat.responses_model`) and runs through the
dispatcher (`server.api.calls`) as a chat completion does. Streamed, it is the event sequence the
``openai`` SDK parses: ``response.created``, ``response.in_progress``, then per output item
``response.output_item.added``, its content part or arguments events and
``response.output_item.done``, then ``response.completed`` (``response.incomplete`` when cut by
``max_output_tokens``, ``response.failed`` on an error), numbered by ``sequence_number`` from 0.
With ``store`` (the default) the response is kept in the app's `ResponseStore`, visible to the key
that made it only. Not here yet: background responses and resuming them by ``starting_after``,
``cancel``, and the WebSocket mode; asking for them is refused, never ignored.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Annotated, Any, Final

import orjson
from fastapi import Path, Query, Request
from fastapi.responses import Response
from pydantic import ValidationError

from protocol.errors import ErrorCode, SluiceError
from server.api import calls
from server.api.compat.openai_chat import refuse
from server.api.compat.responses_model import (
    Plan,
    ResponsesRequest,
    call_item,
    message_item,
    new_item_id,
    plan,
    usage,
)
from server.api.compat.responses_store import MemoryResponseStore, ResponseStore, StoredResponse
from server.api.errors import Family, FieldError, StatusError, field_of, json_response, validation_errors
from server.api.routing import api_router, caller_key, error_model
from server.api.streams import event_stream
from server.backends.base import ToolCall
from server.dispatcher import Finished
from server.services import services_of

__all__ = ["router", "store_of"]

_ERRORS: Final[dict[int | str, dict[str, Any]]] = {
    status: {"model": error_model(Family.OPENAI)} for status in (400, 401, 404, 429, 503)
}
_BODY_DOC: Final[dict[str, Any]] = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": ResponsesRequest.model_json_schema(by_alias=True)}},
    }
}
ResponseId = Annotated[str, Path(max_length=128)]

router = api_router(Family.OPENAI, prefix="/v1", tags=["OpenAI Responses API"], responses=_ERRORS)


def store_of(request: Request) -> ResponseStore:
    """The app's response store (made on first use, bounded by the settings)."""
    state = request.app.state
    store: ResponseStore | None = getattr(state, "sluice_responses", None)
    if store is None:
        settings = services_of(request).settings
        store = MemoryResponseStore(ttl_s=settings.responses_ttl_s, max_count=settings.responses_max)
        state.sluice_responses = store
    return store


async def _body(request: Request) -> ResponsesRequest:
    try:
        raw = orjson.loads(await request.body())
    except orjson.JSONDecodeError:
        raise FieldError("body", ErrorCode.INVALID_REQUEST, "the body is not valid JSON") from None
    if not isinstance(raw, dict):
        raise FieldError("body", ErrorCode.INVALID_REQUEST, "the body must be a JSON object")
    try:
        return ResponsesRequest.model_validate(raw)
    except ValidationError as exc:
        first = validation_errors(exc)[0]
        field = field_of(tuple(first.get("loc", ())))
        reason = str(first.get("msg", "invalid value")).removeprefix("Value error, ")[:200]
        raise FieldError(field, ErrorCode.INVALID_REQUEST, f"invalid field {field!r}: {reason}") from None


class _Draft:
    """One response being answered: its id, the request's echoed settings, its output so far."""

    def __init__(self, body: ResponsesRequest, run: Plan, key_id: str, store: ResponseStore) -> None:
        self.id = new_item_id("resp")
        self.body, self.run, self.key_id, self.store = body, run, key_id, store
        self.created_at = int(time.time())
        self.model = body.model or ""
        self.output: list[dict[str, Any]] = []

    def view(
        self, status: str, finished: Finished | None = None, error: SluiceError | None = None
    ) -> dict[str, Any]:
        body = self.body
        text_format = (
            body.text.format.model_dump(by_alias=True, exclude_none=True)
            if body.text and body.text.format
            else None
        )
        cut = finished is not None and finished.finish_reason == "length"
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "completed_at": int(time.time()) if status == "completed" else None,
            "background": False,
            "error": {"code": "server_error", "message": error.message} if error is not None else None,
            "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
            "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "metadata": body.metadata or {},
            "model": finished.model if finished is not None else self.model,
            "output": list(self.output),
            "parallel_tool_calls": body.parallel_tool_calls,
            "previous_response_id": body.previous_response_id,
            "reasoning": None,
            "store": body.store,
            "temperature": body.temperature if body.temperature is not None else 1.0,
            "text": {"format": text_format or {"type": "text"}},
            "tool_choice": body.tool_choice if body.tool_choice is not None else "auto",
            "tools": self.run.tools,
            "top_p": body.top_p if body.top_p is not None else 1.0,
            "truncation": "disabled",
            "usage": usage(finished) if finished is not None else None,
        }

    def keep(self, view: dict[str, Any]) -> None:
        """Store ``view`` (with the conversation to continue from) when the request asked to."""
        if self.body.store:
            stored = StoredResponse(
                self.key_id, view, self.run.input_items, [*self.run.turns, *_turns(self.output)]
            )
            self.store.put(self.id, stored)


def _status(finished: Finished) -> str:
    return "incomplete" if finished.finish_reason == "length" else "completed"


def _turns(output: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The output items as one assistant turn of the protocol (for ``previous_response_id``)."""
    text = "".join(part["text"] for item in output if item["type"] == "message" for part in item["content"])
    calls_made = [
        {
            "id": item["call_id"],
            "type": "function",
            "function": {"name": item["name"], "arguments": item["arguments"]},
        }
        for item in output
        if item["type"] == "function_call"
    ]
    if not text and not calls_made:
        return []
    turn: dict[str, Any] = {"role": "assistant", "content": text}
    return [{**turn, "tool_calls": calls_made}] if calls_made else [turn]


@router.post(
    "/responses", summary="Create a response (whole, or streamed with stream: true)", openapi_extra=_BODY_DOC
)
async def create_response(request: Request) -> Response:
    body = await _body(request)
    key_id = caller_key(request)
    store = store_of(request)
    previous: list[dict[str, Any]] = []
    if body.previous_response_id is not None:
        earlier = store.get(body.previous_response_id, key_id)
        if earlier is None:
            raise refuse("previous_response_id", f"no stored response {body.previous_response_id!r}")
        previous = earlier.turns
    draft = _Draft(body, plan(body, previous), key_id, store)
    if body.stream:
        generation = await calls.start_generation(request, key_id, draft.run.message)
        draft.model = generation.model
        return event_stream(_events(draft, generation), services_of(request).settings)
    reply = await calls.complete(request, key_id, draft.run.message)
    status = _status(reply.finished)
    if reply.text:
        draft.output.append(message_item(new_item_id("msg"), reply.text, status))
    for call in reply.tool_calls:
        if draft.run.rules.keep(call):
            draft.output.append(call_item(new_item_id("fc"), call, "completed"))
    view = draft.view(status, reply.finished)
    draft.keep(view)
    return json_response(view)


class _Numbered:
    """Server-sent events with consecutive ``sequence_number``s from 0."""

    def __init__(self) -> None:
        self.next = 0

    def event(self, kind: str, **fields: Any) -> bytes:
        data = orjson.dumps({"type": kind, "sequence_number": self.next, **fields})
        self.next += 1
        return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"


async def _events(draft: _Draft, generation: calls.Generation) -> AsyncIterator[bytes]:
    numbered = _Numbered()
    started = draft.view("in_progress")
    draft.keep(started)  # retrievable while it streams
    yield numbered.event("response.created", response=started)
    yield numbered.event("response.in_progress", response=draft.view("in_progress"))
    text: list[str] = []
    item_id, index = "", -1
    delta_head = b""
    ended = False

    def settle_text(status: str) -> dict[str, Any]:
        """The open message item, with the text so far, as it ends with ``status``."""
        item = message_item(item_id, "".join(text), status)
        draft.output[index] = item
        text.clear()
        return item

    def close_text(status: str) -> list[bytes]:
        item = settle_text(status)
        whole = item["content"][0]["text"]
        where = {"item_id": item_id, "output_index": index, "content_index": 0}
        return [
            numbered.event("response.output_text.done", **where, text=whole, logprobs=[]),
            numbered.event("response.content_part.done", **where, part=item["content"][0]),
            numbered.event("response.output_item.done", output_index=index, item=item),
        ]

    try:
        async for piece in generation.items():
            if isinstance(piece, str):
                if not delta_head:
                    item_id, index = new_item_id("msg"), len(draft.output)
                    opened = message_item(item_id, "", "in_progress")
                    draft.output.append({**opened, "content": []})
                    yield numbered.event(
                        "response.output_item.added", output_index=index, item=draft.output[index]
                    )
                    where = {"item_id": item_id, "output_index": index, "content_index": 0}
                    yield numbered.event("response.content_part.added", **where, part=opened["content"][0])
                    # Every delta is this head, its number and the piece: built once per item.
                    delta_head = (
                        b"event: response.output_text.delta\ndata: "
                        + orjson.dumps({"type": "response.output_text.delta", **where, "logprobs": []})[:-1]
                        + b',"sequence_number":'
                    )
                text.append(piece)
                yield delta_head + str(numbered.next).encode() + b',"delta":' + orjson.dumps(piece) + b"}\n\n"
                numbered.next += 1
            elif isinstance(piece, ToolCall):
                if not draft.run.rules.keep(piece):
                    continue
                if delta_head:
                    for event in close_text("completed"):
                        yield event
                    delta_head = b""
                for event in _call_events(draft, numbered, piece):
                    yield event
            else:
                status = _status(piece)
                if delta_head:
                    for event in close_text(status):
                        yield event
                view = draft.view(status, piece)
                draft.keep(view)
                ended = True
                yield numbered.event(f"response.{status}", response=view)
    except SluiceError as exc:
        if delta_head:
            settle_text("incomplete")
        view = draft.view("failed", error=exc)
        draft.keep(view)
        ended = True
        yield numbered.event("response.failed", response=view)
    finally:
        if not ended:  # the client left mid-stream: the generation was cancelled
            if delta_head:
                settle_text("incomplete")
            draft.keep(draft.view("cancelled"))


def _call_events(draft: _Draft, numbered: _Numbered, call: ToolCall) -> list[bytes]:
    item_id, index = new_item_id("fc"), len(draft.output)
    item = call_item(item_id, call, "completed")
    draft.output.append(item)
    where = {"item_id": item_id, "output_index": index}
    return [
        numbered.event(
            "response.output_item.added",
            output_index=index,
            item={**item, "status": "in_progress", "arguments": ""},
        ),
        numbered.event("response.function_call_arguments.delta", **where, delta=call.arguments),
        numbered.event(
            "response.function_call_arguments.done", **where, name=call.name, arguments=call.arguments
        ),
        numbered.event("response.output_item.done", output_index=index, item=item),
    ]


def _stored(request: Request, response_id: str) -> StoredResponse:
    stored = store_of(request).get(response_id, caller_key(request))
    if stored is None:
        raise StatusError(404, ErrorCode.INVALID_REQUEST, f"no response {response_id!r} (unknown or expired)")
    return stored


@router.get("/responses/{response_id}", summary="A stored response")
async def get_response(
    request: Request, response_id: ResponseId, stream: Annotated[bool, Query()] = False
) -> Response:
    if stream:
        raise refuse("stream", "resuming a stored response as a stream is not supported yet")
    return json_response(_stored(request, response_id).response)


@router.delete("/responses/{response_id}", summary="Delete a stored response")
async def delete_response(request: Request, response_id: ResponseId) -> Response:
    _stored(request, response_id)
    store_of(request).delete(response_id, caller_key(request))
    return json_response({"id": response_id, "object": "response.deleted", "deleted": True})


@router.get("/responses/{response_id}/input_items", summary="The input items of a stored response")
async def input_items(
    request: Request,
    response_id: ResponseId,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    order: Annotated[str, Query(pattern="^(asc|desc)$")] = "desc",
    after: Annotated[str | None, Query(max_length=256)] = None,
) -> Response:
    items = list(_stored(request, response_id).input_items)
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
