"""The Ollama-compatible API driven by the official ``ollama`` package, streaming and not."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import numpy as np
import ollama
import orjson
import pytest

from tests.api.conftest import MODEL
from tests.support.ollama_emulator import Emulator

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def client(base_url: str) -> AsyncIterator[ollama.AsyncClient]:
    yield ollama.AsyncClient(host=base_url)


async def test_chat(client: ollama.AsyncClient, emulator: Emulator) -> None:
    messages = [{"role": "user", "content": "chat with ollama client"}]
    reply = await client.chat(model=MODEL, messages=messages, options={"num_predict": 9, "num_ctx": 2048})
    assert reply.done is True and reply.done_reason == "length"
    assert reply.message.role == "assistant"
    assert reply.message.content == emulator.expected_text(
        {"messages": messages, "options": {"num_predict": 9}}
    )
    assert reply.eval_count == 9 and reply.total_duration is not None and reply.total_duration > 0


async def test_chat_stream(client: ollama.AsyncClient, emulator: Emulator) -> None:
    messages = [{"role": "system", "content": "short"}, {"role": "user", "content": "stream it"}]
    parts = [part async for part in await client.chat(model=MODEL, messages=messages, stream=True)]
    assert all(not part.done for part in parts[:-1]) and parts[-1].done
    assert parts[-1].done_reason == "stop" and parts[-1].message.content == ""
    assert parts[-1].eval_count == 200 and parts[-1].prompt_eval_count is not None
    assert "".join(part.message.content or "" for part in parts) == emulator.expected_text(
        {"messages": messages}
    )


async def test_generate(client: ollama.AsyncClient, emulator: Emulator) -> None:
    whole = await client.generate(model=MODEL, prompt="generate whole", system="terse")
    assert whole.response == emulator.expected_text({"prompt": "generate whole", "system": "terse"})
    parts = [part async for part in await client.generate(model=MODEL, prompt="generate parts", stream=True)]
    assert "".join(part.response for part in parts) == emulator.expected_text({"prompt": "generate parts"})
    assert parts[-1].done and parts[-1].done_reason == "stop"


async def test_generate_with_nothing_to_do_loads(client: ollama.AsyncClient) -> None:
    loaded = await client.generate(model=MODEL)
    assert loaded.done and loaded.done_reason == "load" and loaded.response == ""
    unloaded = await client.generate(model=MODEL, keep_alive=0)
    assert unloaded.done_reason == "unload"


async def test_embed(client: ollama.AsyncClient) -> None:
    result = await client.embed(model="all-MiniLM-L6-v2", input=["a river", "a stream", "a tax"])
    vectors = np.array(result.embeddings)
    assert result.model == "all-MiniLM-L6-v2" and vectors.shape == (3, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    upstream = await client.embed(model="ollama/nomic-embed-text", input="through to ollama")
    assert len(upstream.embeddings[0]) == 16


async def test_list_and_version(client: ollama.AsyncClient, base_url: str) -> None:
    names = {model.model for model in (await client.list()).models}
    assert {MODEL, "all-MiniLM-L6-v2"} <= names
    async with httpx.AsyncClient(base_url=base_url) as http:
        version = await http.get("/api/version")
    assert version.status_code == 200 and isinstance(version.json()["version"], str)


async def test_errors_come_as_ollama_does(client: ollama.AsyncClient, base_url: str) -> None:
    with pytest.raises(ollama.ResponseError) as missing:
        await client.chat(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    assert missing.value.status_code == 404
    received: list[str] = []
    with pytest.raises(ollama.ResponseError) as midstream:
        stream = await client.generate(model="fault-error-midstream", prompt="x", stream=True)
        async for part in stream:
            received.append(part.response)
    assert "".join(received) and "unexpected EOF" in midstream.value.error
    async with httpx.AsyncClient(base_url=base_url) as http:
        # curl -d says form-encoded; Ollama parses the body as JSON anyway, and so does sluice.
        bare = await http.post(
            "/api/generate",
            content=orjson.dumps({"model": MODEL, "prompt": "x", "stream": False}),
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
        assert bare.status_code == 200 and bare.json()["done"] is True
        invalid = await http.post("/api/chat", json={"model": MODEL, "messages": [{"role": "robot"}]})
        assert invalid.status_code == 422 and "messages[0].role" in invalid.json()["error"]
        images = await http.post("/api/generate", json={"model": MODEL, "prompt": "x", "images": ["AAAA"]})
        assert images.status_code == 400 and images.json() == {
            "error": "images are not supported by sluice's models"
        }
