"""The SSE fallback against the fake server's SSE endpoints (Starlette on uvicorn, loopback)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import sluice_client
from sluice_client import AsyncClient, Client, ErrorCode, SluiceError

from protocol.messages import Cancel, Generate
from tests.client_python.fake_server import FakeServer, expected_text, expected_vector
from tests.client_python.knobs import FAST


async def test_auto_falls_back_to_sse_when_websocket_is_refused(fake_sse: FakeServer) -> None:
    # The Starlette app has no WebSocket route: the upgrade is answered 403, as a blocking proxy would.
    async with AsyncClient(fake_sse.sse_url, backoff=FAST) as client:
        s = await client.session()
        assert s.transport == "sse"
        stream = s.generate("over sse")
        assert "".join([piece async for piece in stream]) == expected_text("over sse", 12)
        assert stream.result is not None and stream.result.finish_reason == "stop"
        vectors = await s.embed([f"e{i}" for i in range(300)], batch_size=100)
        assert vectors.shape == (300, 8)
        np.testing.assert_array_equal(vectors[150], expected_vector("e150", 8))
        assert (await s.chat("one")).text.startswith("[1] ")
        assert (await s.chat("two")).text.startswith("[3] ")
        assert fake_sse.ws_connections == 0 and fake_sse.sse_streams == 1
        session_id = s.id
    assert session_id not in fake_sse.session_ids()  # closing an SSE session DELETEs it


async def test_explicit_websocket_does_not_fall_back(fake_sse: FakeServer) -> None:
    with pytest.raises(SluiceError) as refused:
        await sluice_client.connect(fake_sse.sse_url, transport="websocket", backoff=FAST)
    assert refused.value.code is ErrorCode.FORBIDDEN


async def test_sse_concurrent_requests_and_cancel(fake_sse: FakeServer) -> None:
    fake_sse.piece_delay_s = 0.02
    async with AsyncClient(fake_sse.sse_url, transport="sse", backoff=FAST) as client:
        s = await client.session()
        keep = s.generate("kept")
        drop = s.generate("dropped")
        async for _ in drop:
            break
        assert (await keep).text == expected_text("kept", 12)
        assert any(m.id == drop.id for m in fake_sse.received_of(Cancel))
        for _ in range(100):
            if drop.result is not None:
                break
            await asyncio.sleep(0.01)
        assert drop.result is not None and drop.result.finish_reason == "cancelled"


async def test_sse_resumes_with_last_event_id_after_the_stream_is_cut(fake_sse: FakeServer) -> None:
    fake_sse.kill_after_deltas = 5
    async with AsyncClient(fake_sse.sse_url, transport="sse", backoff=FAST) as client:
        s = await client.session()
        first_id = s.id
        result = await s.generate("cut stream")
        assert result.text == expected_text("cut stream", 12)
        assert s.reconnects == 1 and s.id == first_id and fake_sse.sse_streams == 2
        assert len(fake_sse.received_of(Generate)) == 1


def test_sync_client_over_sse(fake_sse: FakeServer) -> None:
    with Client(fake_sse.sse_url, transport="sse", backoff=FAST) as client:
        s = client.session()
        assert "".join(s.generate("sync sse")) == expected_text("sync sse", 12)
        assert s.classify(["a", "b"], ["x", "y"])[1].keys() == {"x", "y"}


async def test_sse_close_event_is_a_close_code(fake_sse: FakeServer) -> None:
    fake_sse.close_after_deltas = (3, 4008)  # slow consumer: resumable
    async with AsyncClient(fake_sse.sse_url, transport="sse", backoff=FAST) as client:
        s = await client.session()
        assert (await s.generate("closed once")).text == expected_text("closed once", 12)
        assert s.reconnects == 1
        fake_sse.close_after_deltas = (1, 4009)  # taken over: stop
        with pytest.raises(SluiceError) as taken:
            await s.generate("closed for good")
        assert taken.value.code is ErrorCode.CANCELLED and s.status == "closed"
