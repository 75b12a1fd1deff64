"""The OpenAI-compatible API: ``/v1/chat/completions``, ``/v1/embeddings``, ``/v1/models``.

Shaped so that the ``openai`` SDK and the tools built on it work unchanged when pointed at sluice
(``base_url=http://host:port/v1``):

- chat completions, whole (``chat.completion``) or streamed as ``chat.completion.chunk`` events
  (a first chunk with the role, one per piece, two per tool call, one with ``finish_reason``,
  then, with ``stream_options.include_usage``, one with ``usage`` and no choices; then
  ``data: [DONE]``), with structured outputs and tools (`server.api.compat.openai_chat` reads the
  request and audits every parameter);
- embeddings with ``encoding_format`` ``float`` or ``base64`` (little-endian float32, what the
  SDK asks for by default and decodes itself);
- the model list, and OpenAI-shaped error bodies (`server.api.errors`, family ``openai``).

Requests become protocol messages and run through the dispatcher (`server.api.calls`). What
sluice cannot do is refused with a 400 naming the parameter (``n`` > 1, token arrays as input,
``logprobs``, an unrecognized parameter), never silently ignored. Embedding ``usage`` counts
whitespace-separated words: the embedders do not report their token counts.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any, Final, Literal

import orjson
from fastapi import Path, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from protocol.errors import ErrorCode, SluiceError
from protocol.messages import MAX_INPUTS
from server.api import calls
from server.api.compat.openai_chat import CallRules, ChatCompletionRequest, refuse, to_generate
from server.api.errors import Family, error_body, json_response, status_for
from server.api.routing import api_router, caller_key, error_model
from server.api.streams import event_stream
from server.backends.base import ToolCall
from server.dispatcher import Finished
from server.services import services_of

__all__ = ["router"]

_ERRORS: Final[dict[int | str, dict[str, Any]]] = {
    status: {"model": error_model(Family.OPENAI)} for status in (400, 401, 404, 422, 429, 503)
}
_SSE_DOC: Final[dict[int | str, dict[str, Any]]] = {
    200: {
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
        "description": "With `stream: true`: `chat.completion.chunk` events, then `data: [DONE]`.",
    }
}
_DONE: Final = b"data: [DONE]\n\n"

router = api_router(Family.OPENAI, prefix="/v1", tags=["OpenAI-compatible API"], responses=_ERRORS)


Text = Annotated[str, StringConstraints(max_length=1_000_000)]


class FunctionCallOut(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class OpenAIAssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCallOut] | None = None


class Choice(BaseModel):
    index: int
    message: OpenAIAssistantMessage
    finish_reason: Literal["stop", "length", "tool_calls"]
    logprobs: None = None


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: CompletionUsage


class OpenAIEmbeddingsRequest(BaseModel):
    # Every parameter OpenAI has; any other is refused (422 naming it), as OpenAI refuses it.
    model_config = ConfigDict(extra="forbid")
    input: Text | list[Text] | list[int] | list[list[int]]
    model: str | None = Field(default=None, min_length=1, max_length=256)
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None  # an end-user identifier: asks nothing of the vectors


class EmbeddingItem(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class OpenAIEmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingItem]
    model: str
    usage: EmbeddingUsage


class OpenAIModel(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "sluice"


class OpenAIModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIModel]


def _usage(finished: Finished) -> dict[str, int]:
    usage = finished.usage
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }


@router.post(
    "/chat/completions",
    response_model=ChatCompletion,
    responses=_SSE_DOC,
    summary="Chat completion (whole, or streamed with stream: true)",
)
async def chat_completions(request: Request, body: ChatCompletionRequest) -> Response:
    message = to_generate(body)
    rules = CallRules(body)
    key_id = caller_key(request)
    completion_id = "chatcmpl-" + secrets.token_hex(12)
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        generation = await calls.start_generation(request, key_id, message)
        events = _chunks(completion_id, generation, include_usage, rules)
        return event_stream(events, services_of(request).settings)
    reply = await calls.complete(request, key_id, message)
    tool_calls = [_call(call) for call in reply.tool_calls if rules.keep(call)]
    assistant: dict[str, Any] = {"role": "assistant", "content": reply.text}
    if tool_calls:
        # As OpenAI answers a reply that is only calls: no content at all, not an empty one.
        assistant = {"role": "assistant", "content": reply.text or None, "tool_calls": tool_calls}
    return json_response(
        {
            "id": completion_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": reply.finished.model,
            "choices": [
                {
                    "index": 0,
                    "message": assistant,
                    "finish_reason": reply.finished.finish_reason,
                    "logprobs": None,
                }
            ],
            "usage": _usage(reply.finished),
        }
    )


def _call(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


async def _chunks(
    completion_id: str, generation: calls.Generation, include_usage: bool, rules: CallRules
) -> AsyncIterator[bytes]:
    """The ``chat.completion.chunk`` events of one generation, then ``[DONE]``.

    A tool call is two chunks, as OpenAI streams one: its index, id, type and name with empty
    ``arguments``, then the arguments (sluice's backends give each call whole)."""
    head = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": int(generation.started_at),
        "model": generation.model,
    }
    # Every content chunk is this prefix, the piece as JSON, and this suffix: built once, not
    # a dict and an orjson call per token.
    prefix = b"data: " + orjson.dumps(head)[:-1] + b',"choices":[{"index":0,"delta":{"content":'
    suffix = (
        b'},"logprobs":null,"finish_reason":null}]' + (b',"usage":null' if include_usage else b"") + b"}\n\n"
    )

    def chunk(delta: dict[str, Any], finish_reason: str | None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        extra = {"usage": None} if include_usage else {}
        return b"data: " + orjson.dumps({**head, "choices": [choice], **extra}) + b"\n\n"

    yield chunk({"role": "assistant", "content": ""}, None)
    try:
        async for item in generation.items():
            if isinstance(item, Finished):
                yield chunk({}, item.finish_reason)
                if include_usage:
                    yield b"data: " + orjson.dumps({**head, "choices": [], "usage": _usage(item)}) + b"\n\n"
            elif isinstance(item, ToolCall):
                if rules.keep(item):
                    index = rules.kept - 1
                    named = {"name": item.name, "arguments": ""}
                    opened = {"index": index, "id": item.id, "type": "function", "function": named}
                    yield chunk({"tool_calls": [opened]}, None)
                    arguments = {"index": index, "function": {"arguments": item.arguments}}
                    yield chunk({"tool_calls": [arguments]}, None)
            else:
                yield prefix + orjson.dumps(item) + suffix
    except SluiceError as exc:
        yield b"data: " + orjson.dumps(error_body(Family.OPENAI, exc, status=status_for(exc))) + b"\n\n"
    yield _DONE


def _word_count(texts: list[str]) -> int:
    return sum(len(text.split()) for text in texts)


@router.post("/embeddings", response_model=OpenAIEmbeddingsResponse, summary="Embeddings (float or base64)")
async def embeddings(request: Request, body: OpenAIEmbeddingsRequest) -> Response:
    raw = body.input
    if isinstance(raw, str):
        texts = [raw]
    elif all(isinstance(item, str) for item in raw):
        texts = [item for item in raw if isinstance(item, str)]
    else:
        raise refuse("input", "token arrays are not supported; send text")
    if not texts:
        raise refuse("input", "at least one input is required")
    if len(texts) > MAX_INPUTS:
        raise refuse("input", f"at most {MAX_INPUTS} inputs per request")
    result = await calls.embed(
        request, caller_key(request), texts, model=body.model, encoding=body.encoding_format
    )
    if body.dimensions is not None and body.dimensions != result.dimensions:
        raise refuse("dimensions", f"model {result.model} has {result.dimensions} dimensions")
    words = _word_count(texts)
    return json_response(
        {
            "object": "list",
            "data": [
                {"object": "embedding", "index": index, "embedding": vector}
                for index, vector in enumerate(result.embeddings)
            ],
            "model": result.model,
            "usage": {"prompt_tokens": words, "total_tokens": words},
        }
    )


def _models(request: Request) -> list[dict[str, Any]]:
    listed = services_of(request).registry.models()
    seen: dict[str, dict[str, Any]] = {}
    for kind in ("generate", "embed", "classify"):
        for name in listed.get(kind, []):
            seen.setdefault(name, {"id": name, "object": "model", "created": 0, "owned_by": "sluice"})
    return list(seen.values())


@router.get("/models", response_model=OpenAIModelList, summary="Models served (generate, embed, classify)")
async def models(request: Request) -> Response:
    return json_response({"object": "list", "data": _models(request)})


@router.get("/models/{model:path}", response_model=OpenAIModel, summary="One model")
async def model(request: Request, model: Annotated[str, Path(max_length=256)]) -> Response:
    for entry in _models(request):
        if entry["id"] == model:
            return json_response(entry)
    raise SluiceError(ErrorCode.MODEL_NOT_FOUND, f"model {model!r} is not served here")
