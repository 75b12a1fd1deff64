"""The OpenAI-compatible API driven by the real ``openai`` SDK, streaming and not."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator

import httpx
import numpy as np
import openai
import pytest

from tests.api.conftest import MODEL
from tests.support.ollama_emulator import Emulator

pytestmark = pytest.mark.timeout(120)

MESSAGES: list[openai.types.chat.ChatCompletionMessageParam] = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "tell me about rivers"},
]
UPSTREAM = {
    "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "tell me about rivers"},
    ]
}


@pytest.fixture
async def client(base_url: str) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0) as sdk:
        yield sdk


async def test_chat_completion(client: openai.AsyncOpenAI, emulator: Emulator) -> None:
    completion = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20)
    assert completion.object == "chat.completion" and completion.model == MODEL
    choice = completion.choices[0]
    assert choice.finish_reason == "length" and choice.message.role == "assistant"
    assert choice.message.content == emulator.expected_text(UPSTREAM | {"options": {"num_predict": 20}})
    assert completion.usage is not None and completion.usage.completion_tokens == 20
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 20


async def test_chat_completion_stream_with_usage(client: openai.AsyncOpenAI, emulator: Emulator) -> None:
    stream = await client.chat.completions.create(
        model=MODEL, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert len({chunk.id for chunk in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == emulator.expected_text(UPSTREAM)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 200
    assert all(chunk.usage is None for chunk in chunks[:-1])


async def test_chat_completion_stream_without_usage(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True, max_tokens=5)
    chunks = [chunk async for chunk in stream]
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(chunk.usage is None for chunk in chunks)


async def test_embeddings_float_and_base64(client: openai.AsyncOpenAI) -> None:
    texts = ["a heron waits", "the water runs"]
    floats = await client.embeddings.create(model="all-MiniLM-L6-v2", input=texts, encoding_format="float")
    assert floats.model == "all-MiniLM-L6-v2" and [d.index for d in floats.data] == [0, 1]
    assert len(floats.data[0].embedding) == 384
    # The SDK asks for base64 when no format is given, and decodes it itself.
    default = await client.embeddings.create(model="all-MiniLM-L6-v2", input=texts)
    assert np.allclose(default.data[1].embedding, floats.data[1].embedding, atol=1e-6)
    raw = await client.embeddings.with_raw_response.create(
        model="all-MiniLM-L6-v2", input="a heron waits", encoding_format="base64"
    )
    encoded = raw.http_response.json()["data"][0]["embedding"]
    decoded = np.frombuffer(base64.b64decode(encoded), dtype="<f4")
    assert np.allclose(decoded, floats.data[0].embedding, atol=1e-6)


async def test_models(client: openai.AsyncOpenAI) -> None:
    listed = [model.id async for model in client.models.list()]
    assert {MODEL, "all-MiniLM-L6-v2", "zero-shot-minilm"} <= set(listed)
    assert (await client.models.retrieve("all-MiniLM-L6-v2")).id == "all-MiniLM-L6-v2"
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("no-such-model")


async def test_errors_are_openai_shaped(client: openai.AsyncOpenAI, base_url: str) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        await client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.UnprocessableEntityError) as invalid:
        await client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=9.0)
    body = invalid.value.body
    assert isinstance(body, dict) and "temperature" in body["message"]
    assert (body["type"], body["param"], body["code"]) == (
        "invalid_request_error",
        "temperature",
        "invalid_request",
    )
    with pytest.raises(openai.BadRequestError) as unsupported:
        await client.chat.completions.create(model=MODEL, messages=MESSAGES, n=2)
    assert "n:" in unsupported.value.message
    async with httpx.AsyncClient(base_url=base_url) as http:
        response = await http.post("/v1/chat/completions", json={"model": MODEL, "messages": []})
    assert response.status_code == 422 and response.json()["error"]["param"] == "messages"


async def test_error_after_output_reaches_the_sdk(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="fault-error-midstream", messages=MESSAGES, stream=True
    )
    received: list[str] = []
    with pytest.raises(openai.APIError) as failed:
        async for chunk in stream:
            received.append(chunk.choices[0].delta.content or "")
    assert "".join(received) and "unexpected EOF" in failed.value.message
