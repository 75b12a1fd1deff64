"""The client against the real server (``sluice serve`` on loopback, generation on the Ollama
emulator, so every text is known in advance): streaming, concurrency, cancel, resume after the
server's socket is cut, SSE, embeddings."""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from sluice_client import AsyncClient, Client

from tests.client_python.knobs import FAST, REAL_MODEL
from tests.client_python.tcp_proxy import TcpProxy
from tests.support.ollama_emulator import Emulator


def upstream_text(emu: Emulator, marker: str) -> str:
    """The text the emulator streamed for the one generation whose newest turn holds ``marker``."""
    records = [r for r in emu.generations() if marker in _newest_turn(r.body)]
    assert len(records) == 1, f"{len(records)} upstream generations hold {marker!r}"
    return emu.expected_text(records[0].body)


def _newest_turn(body: dict[str, object]) -> str:
    messages = body.get("messages")
    if isinstance(messages, list) and messages:
        return str(messages[-1].get("content"))
    return str(body.get("prompt"))


def port_of(url: str) -> int:
    port = urlsplit(url).port
    assert port is not None
    return port


def require_sse(url: str) -> None:
    response = httpx.post(f"{url}/v1/sessions", json={"type": "hello", "protocol": 1}, timeout=10)
    if response.status_code in (404, 405):
        pytest.skip(
            f"the server has no SSE endpoints yet (POST /v1/sessions answered {response.status_code})"
        )
    assert response.status_code == 201, response.text
    session = response.json()["session"]
    httpx.delete(f"{url}/v1/sessions/{session}", timeout=10)


async def test_async_streaming_with_concurrent_requests(real_server: str, emu: Emulator) -> None:
    emu.configure(token_rate=50)  # a third of a second each: long enough to overlap on a busy machine
    async with AsyncClient(real_server, backoff=FAST) as client:
        s = await client.session()
        assert s.transport == "websocket" and REAL_MODEL in s.models.generate
        markers = [f"async-marker-{i}" for i in range(4)]
        streams = [s.generate(f"tell me about {marker}") for marker in markers]
        vectors_task = asyncio.ensure_future(s.embed(["while", "generating"]))
        results = await asyncio.gather(*(stream.collect() for stream in streams))
        for marker, result in zip(markers, results, strict=True):
            assert result.text == upstream_text(emu, marker)
            assert (result.finish_reason, result.model) == ("stop", REAL_MODEL)
            assert result.usage.completion_tokens > 0 and result.timings.total_ms > 0
        assert (await vectors_task).shape == (2, 384)
        generations = emu.generations()
        assert len(generations) == 4
        # In flight together: every upstream generation began before the first one ended.
        assert max(r.started for r in generations) < min(r.finished or 0 for r in generations)


def test_sync_streaming(real_server: str, emu: Emulator) -> None:
    with Client(real_server, backoff=FAST) as client:
        s = client.session()
        pieces = list(s.generate("sync-marker-1"))
        assert "".join(pieces) == upstream_text(emu, "sync-marker-1")
        first = s.chat("chat-marker-1").collect()
        second = s.chat("chat-marker-2").collect()
        assert first.text == upstream_text(emu, "chat-marker-1")
        # The server kept the conversation: the second turn went upstream with the first in it.
        (record,) = [r for r in emu.generations() if "chat-marker-2" in _newest_turn(r.body)]
        assert [m["content"] for m in record.body["messages"]] == [
            "chat-marker-1",
            first.text,
            "chat-marker-2",
        ]
        assert second.text == emu.expected_text(record.body)
        scores = s.classify("I loved this film", ["positive", "negative"])
        assert max(scores, key=scores.__getitem__) == "positive"


async def test_cancel_stops_the_upstream_generation(real_server: str, emu: Emulator) -> None:
    emu.configure(token_rate=20, tokens=200)  # ten seconds if nobody stops it
    async with AsyncClient(real_server, backoff=FAST) as client:
        s = await client.session()
        stream = s.generate("cancel-marker-1")
        async for _ in stream:
            if len(stream.text.split()) >= 2:
                break
        for _ in range(500):
            if stream.result is not None:
                break
            await asyncio.sleep(0.01)
        assert stream.result is not None and stream.result.finish_reason == "cancelled"
        (record,) = emu.generations()
        assert await emu.until(lambda: record.client_closed_early)
        assert record.pieces_sent < 200 and s.inflight == []


async def test_resume_after_the_server_socket_is_cut(real_server: str, emu: Emulator) -> None:
    emu.configure(token_rate=80, tokens=48)
    with TcpProxy(port_of(real_server)) as proxy:
        async with AsyncClient(proxy.url, backoff=FAST) as client:
            s = await client.session()
            session_id = s.id
            streams = [s.generate("resume-marker-1"), s.generate("resume-marker-2")]
            cut = False
            async for _ in streams[0]:
                if not cut and len(streams[0].text.split()) >= 6:
                    assert proxy.kill() == 1  # both ends reset: the server's socket dies mid-stream
                    cut = True
            other = await streams[1].collect()
            assert cut and streams[0].text == upstream_text(emu, "resume-marker-1")
            assert other.text == upstream_text(emu, "resume-marker-2")
            assert s.reconnects == 1 and s.id == session_id and proxy.connections == 2
            assert len(emu.generations()) == 2  # resumed, not sent again


async def test_sse_transport(real_server: str, emu: Emulator) -> None:
    require_sse(real_server)
    async with AsyncClient(real_server, transport="sse", backoff=FAST) as client:
        s = await client.session()
        assert s.transport == "sse"
        result = await s.generate("sse-marker-1")
        assert result.text == upstream_text(emu, "sse-marker-1")
        assert (await s.embed([f"t{i}" for i in range(300)], batch_size=100)).shape == (300, 384)


async def test_auto_falls_back_to_sse_and_resumes_with_last_event_id(real_server: str, emu: Emulator) -> None:
    require_sse(real_server)
    emu.configure(token_rate=80, tokens=48)
    with TcpProxy(port_of(real_server), block_websocket=True) as proxy:
        async with AsyncClient(proxy.url, backoff=FAST) as client:
            s = await client.session()
            assert s.transport == "sse" and proxy.refused_upgrades == 1
            stream = s.generate("fallback-marker-1")
            cut = False
            async for _ in stream:
                if not cut and len(stream.text.split()) >= 6:
                    assert proxy.kill() >= 1
                    cut = True
            assert stream.text == upstream_text(emu, "fallback-marker-1")
            assert s.reconnects == 1 and s.transport == "sse"


def test_embed_1000_texts(real_server: str) -> None:
    texts = [f"sentence number {i} about a river" for i in range(1000)]
    with Client(real_server, backoff=FAST) as client:
        s = client.session()
        vectors = s.embed(texts, progress=False)
        assert vectors.shape == (1000, 384) and vectors.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
        np.testing.assert_allclose(vectors[777], s.embed(texts[777]), atol=1e-5)
        assert not np.allclose(vectors[0], vectors[1])
