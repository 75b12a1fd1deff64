"""Ollama's model metadata and legacy embeddings through the official ``ollama`` package:
``show()``, ``ps()`` and ``embeddings()`` against a real server with the emulator as its Ollama."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import numpy as np
import ollama
import pytest

from tests.api.conftest import MODEL, sluice
from tests.support.ollama_emulator import Emulator
from tests.support.server import free_port

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def client(base_url: str) -> AsyncIterator[ollama.AsyncClient]:
    yield ollama.AsyncClient(host=base_url)


async def test_show_an_embedded_embedder(client: ollama.AsyncClient) -> None:
    shown = await client.show("all-MiniLM-L6-v2")
    assert shown.capabilities == ["embedding"]
    assert shown.details is not None and shown.details.family == "bert"
    assert shown.modelinfo is not None and shown.modelinfo["bert.embedding_length"] == 384
    assert shown.modelinfo["general.architecture"] == "bert"


async def test_show_relays_upstream(client: ollama.AsyncClient, emulator: Emulator) -> None:
    emulator.reset()
    shown = await client.show(MODEL)
    assert shown.capabilities == ["completion", "tools"] and shown.template == "{{ .Prompt }}"
    assert shown.details is not None and shown.details.family == "llama3.2"
    assert [(r.path, r.body) for r in emulator.records if r.path == "/api/show"] == [
        ("/api/show", {"model": MODEL})
    ]
    embedder = await client.show("ollama/nomic-embed-text")
    assert embedder.capabilities == ["embedding"]


async def test_show_unknown_model_is_404(client: ollama.AsyncClient, base_url: str) -> None:
    with pytest.raises(ollama.ResponseError) as missing:
        await client.show("no-such-model")
    assert missing.value.status_code == 404
    async with httpx.AsyncClient(base_url=base_url) as http:
        nameless = await http.post("/api/show", json={})
    assert nameless.status_code == 422 and "model is required" in nameless.json()["error"]


async def test_ps_lists_embedded_and_upstream_models(client: ollama.AsyncClient) -> None:
    await client.generate(model=MODEL, prompt="load it", options={"num_predict": 2})
    running = {entry.model: entry for entry in (await client.ps()).models}
    assert "all-MiniLM-L6-v2" in running and "zero-shot-minilm" not in running  # no Ollama kind
    assert MODEL in running  # what the emulator says it has loaded
    local = running["all-MiniLM-L6-v2"]
    assert local.details is not None and local.details.family == "bert"
    assert local.expires_at is not None and local.expires_at.year > 2100


async def test_ps_with_ollama_down_lists_the_embedded_models() -> None:
    with sluice({"SLUICE_OLLAMA_URLS": f"http://127.0.0.1:{free_port()}"}) as server:
        running = await ollama.AsyncClient(host=server.url).ps()
    assert [entry.model for entry in running.models] == ["all-MiniLM-L6-v2"]


async def test_legacy_embeddings(client: ollama.AsyncClient) -> None:
    legacy = await client.embeddings(model="all-MiniLM-L6-v2", prompt="a heron waits")
    current = await client.embed(model="all-MiniLM-L6-v2", input="a heron waits")
    assert len(legacy.embedding) == 384
    assert np.allclose(legacy.embedding, current.embeddings[0], atol=1e-5)
    upstream = await client.embeddings(model="ollama/nomic-embed-text", prompt="through to ollama")
    assert len(upstream.embedding) == 16
    empty = await client.embeddings(model="all-MiniLM-L6-v2", prompt="")
    assert list(empty.embedding) == []
    with pytest.raises(ollama.ResponseError) as missing:
        await client.embeddings(model="no-such-embedder", prompt="x")
    assert missing.value.status_code == 404
