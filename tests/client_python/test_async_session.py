"""The async API against the fake server over a real WebSocket on loopback."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import sluice_client
from sluice_client import AsyncClient, ErrorCode, SluiceError

from protocol.messages import Ack, Cancel, Embed, Generate
from tests.client_python.fake_server import FakeServer, expected_text, expected_vector
from tests.client_python.knobs import FAST


async def _until(predicate, within: float = 20.0) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while loop.time() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.01)
    return predicate()


async def test_generate_streams_pieces_then_result(fake: FakeServer) -> None:
    async with AsyncClient(fake.url, backoff=FAST) as client:
        s = await client.session()
        stream = s.generate("hello there", temperature=0.5, max_tokens=100)
        pieces = [piece async for piece in stream]
        assert "".join(pieces) == expected_text("hello there", 12)
        assert len(pieces) == 12
        result = stream.result
        assert result is not None
        assert (result.finish_reason, result.model, result.usage.completion_tokens) == (
            "stop",
            "fake-gen",
            12,
        )
        assert result.text == stream.text == "".join(pieces)
        assert s.transport == "websocket" and s.inflight == []
        sent = fake.received_of(Generate)[-1]
        assert sent.options.temperature == 0.5 and sent.options.max_tokens == 100


async def test_options_dict_beside_keyword_options(fake: FakeServer) -> None:
    async with AsyncClient(fake.url, backoff=FAST) as client:
        s = await client.session()
        result = await s.generate("opts", options={"temperature": 0.25, "stop": "\n"}, max_tokens=4)
        assert result.text == expected_text("opts", 4) and result.finish_reason == "length"
        sent = fake.received_of(Generate)[-1]
        assert (sent.options.temperature, sent.options.stop, sent.options.max_tokens) == (0.25, ["\n"], 4)
        await s.chat("hi", options={"seed": 3})
        assert fake.received_of(Generate)[-1].options.seed == 3
        with pytest.raises(TypeError, match="num_predict"):
            s.generate("x", options={"num_predict": 3})
        with pytest.raises(TypeError, match="both in options= and as keywords: seed"):
            s.chat("x", options={"seed": 1}, seed=2)
        assert len(fake.received_of(Generate)) == 2


async def test_await_stream_and_length_limit(fake: FakeServer) -> None:
    s = await sluice_client.connect(fake.url, backoff=FAST)
    try:
        result = await s.generate("short", max_tokens=3)
        assert result.finish_reason == "length"
        assert result.text == expected_text("short", 3)
    finally:
        await s.close()


async def test_concurrent_requests_interleave_on_one_session(fake: FakeServer) -> None:
    async with AsyncClient(fake.url, backoff=FAST) as client:
        s = await client.session()
        prompts = [f"prompt {i}" for i in range(5)]
        streams = [s.generate(prompt) for prompt in prompts]
        order: list[str] = []

        async def read(stream: sluice_client.AsyncGenerateStream) -> str:
            async for _ in stream:
                order.append(stream.id)
            return stream.text

        texts = await asyncio.gather(*(read(stream) for stream in streams), s.embed(["x", "y"]))
        assert texts[:5] == [expected_text(prompt, 12) for prompt in prompts]
        assert texts[5].shape == (2, 8)
        # All five were in flight together: the second stream had output before the first ended.
        first_end = max(i for i, request_id in enumerate(order) if request_id == streams[0].id)
        assert streams[1].id in order[:first_end]
        assert fake.ws_connections == 1


async def test_break_sends_cancel_and_ends_request(fake: FakeServer) -> None:
    fake.piece_delay_s = 0.02
    async with AsyncClient(fake.url, backoff=FAST) as client:
        s = await client.session()
        stream = s.generate("long one")
        async for piece in stream:
            assert piece
            if len(stream.text.split()) >= 3:
                break
        assert await _until(lambda: any(c.id == stream.id for c in fake.received_of(Cancel)))
        assert await _until(lambda: stream.result is not None)
        assert stream.result is not None and stream.result.finish_reason == "cancelled"
        assert s.inflight == []
        assert len(stream.text.split()) == 3  # nothing after the break reached the caller


async def test_explicit_cancel_returns_cancelled_result(fake: FakeServer) -> None:
    fake.piece_delay_s = 0.02
    async with AsyncClient(fake.url, backoff=FAST) as client:
        s = await client.session()
        stream = s.generate("cancel me")
        async for _ in stream:
            break
        # The loop above already cancelled; a second stream is cancelled explicitly.
        other = s.generate("cancel me too")
        await asyncio.sleep(0.05)
        result = await other.cancel()
        assert result.finish_reason == "cancelled"
        assert len(result.text.split()) < 12
        assert any(c.id == other.id for c in fake.received_of(Cancel))


async def test_leaving_async_with_cancels(fake: FakeServer) -> None:
    fake.piece_delay_s = 0.02
    async with AsyncClient(fake.url, backoff=FAST) as client:
        s = await client.session()
        async with s.generate("scoped") as stream:
            async for _ in stream:
                break
        async with s.generate("finished") as done:
            await done
        assert await _until(lambda: s.inflight == [])
        assert [c.id for c in fake.received_of(Cancel)] == [stream.id]


async def test_task_cancellation_cancels_request(fake: FakeServer) -> None:
    fake.piece_delay_s = 0.02
    async with AsyncClient(fake.url, backoff=FAST) as client:
        s = await client.session()
        stream = s.generate("interrupted")

        async def consume() -> None:
            async for _ in stream:
                pass

        task = asyncio.create_task(consume())
        await _until(lambda: len(stream.text) > 0)
        task.cancel()  # what KeyboardInterrupt does to asyncio.run's main task
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await _until(lambda: any(c.id == stream.id for c in fake.received_of(Cancel)))
        assert await _until(lambda: s.inflight == [])


async def test_server_errors_become_typed_errors(fake: FakeServer) -> None:
    async with AsyncClient(fake.url, backoff=FAST) as client:
        s = await client.session()
        with pytest.raises(SluiceError) as missing:
            await s.generate("x", model="error:model_not_found")
        assert missing.value.code is ErrorCode.MODEL_NOT_FOUND and not missing.value.retryable
        with pytest.raises(SluiceError) as limited:
            async for _ in s.generate("x", model="error:rate_limited"):
                pass
        assert limited.value.code is ErrorCode.RATE_LIMITED
        assert limited.value.retryable and limited.value.retry_after_ms == 20
        with pytest.raises(SluiceError) as cls_error:
            await s.classify("x", ["a", "b"], model="error:upstream_unavailable")
        assert cls_error.value.code is ErrorCode.UPSTREAM_UNAVAILABLE
        assert (
            len([m for m in fake.received if getattr(m, "model", None) == "error:upstream_unavailable"]) == 3
        )


async def test_invalid_arguments_are_refused_before_sending(fake: FakeServer) -> None:
    async with AsyncClient(fake.url, backoff=FAST) as client:
        s = await client.session()
        with pytest.raises(SluiceError) as hot:
            s.generate("x", temperature=5.0)
        assert hot.value.code is ErrorCode.INVALID_MESSAGE and "temperature" in hot.value.message
        with pytest.raises(SluiceError):
            s.generate("x", messages=[{"role": "user", "content": "y"}])
        with pytest.raises(TypeError, match="tempreature"):
            s.generate("x", tempreature=0.1)
        with pytest.raises(SluiceError):
            await s.classify("x", ["only one"])
        with pytest.raises(SluiceError) as big:
            s.generate("x" * (2 << 20))
        assert big.value.code is ErrorCode.MESSAGE_TOO_LARGE
        assert fake.received_of(Generate) == []


async def test_embed_1000_texts_in_concurrent_batches(fake: FakeServer) -> None:
    texts = [f"text number {i}" for i in range(1000)]
    async with AsyncClient(fake.url, backoff=FAST) as client:
        s = await client.session()
        vectors = await s.embed(texts, progress=False)
        assert vectors.shape == (1000, 8) and vectors.dtype == np.float32
        expected = np.stack([expected_vector(text, 8) for text in texts])
        np.testing.assert_array_equal(vectors, expected)
        sent = fake.received_of(Embed)
        assert sorted(len(m.texts) for m in sent) == [232, 256, 256, 256]
        assert all(m.encoding == "base64" for m in sent)
        assert fake.max_embeds_in_flight > 1
        # Each big result is acknowledged, so the server may trim its replay log.
        # The last ack leaves with the last result, so it may still be on its way to the server.
        assert await _until(lambda: len(fake.received_of(Ack)) >= 4)
        acks = [m.seq for m in fake.received_of(Ack)]
        assert len(acks) == 4 and acks == sorted(acks) and acks[-1] <= s._connection.state.last_seq
        one = await s.embed("single")
        assert one.shape == (8,)
        np.testing.assert_array_equal(one, expected_vector("single", 8))


async def test_embed_retries_retryable_errors(fake: FakeServer) -> None:
    async with AsyncClient(fake.url, backoff=FAST) as client:
        s = await client.session()
        vectors = await s.embed(["a", "b"], model="flaky:overloaded")
        assert vectors.shape == (2, 8)
        assert len(fake.received_of(Embed)) == 2


async def test_classify_returns_scores_best_first(fake: FakeServer) -> None:
    async with AsyncClient(fake.url, backoff=FAST) as client:
        s = await client.session()
        scores = await s.classify("the film was great", ["positive", "negative", "neutral"])
        assert set(scores) == {"positive", "negative", "neutral"}
        assert list(scores.values()) == sorted(scores.values(), reverse=True)
        assert abs(sum(scores.values()) - 1.0) < 1e-6
        many = await s.classify(["a", "b", "c"], ["x", "y"], multi_label=True)
        assert len(many) == 3 and all(set(row) == {"x", "y"} for row in many)


async def test_chat_keeps_history_in_the_session(fake: FakeServer) -> None:
    async with AsyncClient(fake.url, backoff=FAST) as client:
        s = await client.session()
        first = await s.chat("hi")
        second = await s.chat("and again")
        assert first.text.startswith("[1] ")
        assert second.text.startswith("[3] ")  # user, assistant, user
        sent = fake.received_of(Generate)
        assert all(m.history for m in sent) and sent[0].messages[0].content == "hi"
        plain = await s.generate("no history")
        assert not plain.text.startswith("[")


async def test_resume_after_socket_kill_gives_exact_text(fake: FakeServer) -> None:
    fake.kill_after_deltas = 4
    async with AsyncClient(fake.url, backoff=FAST) as client:
        s = await client.session()
        session_id = s.id
        streams = [s.generate("resume me"), s.generate("and me")]
        texts = await asyncio.gather(*(stream.collect() for stream in streams))
        assert [t.text for t in texts] == [expected_text("resume me", 12), expected_text("and me", 12)]
        assert s.reconnects == 1 and s.id == session_id
        assert fake.ws_connections == 2
        resume = fake.hellos[-1]
        assert resume.session == session_id and resume.last_seq is not None and resume.last_seq >= 4
        # The requests were not sent again: the server had them all along.
        assert len(fake.received_of(Generate)) == 2


async def test_repeated_kills_lose_and_repeat_nothing(fake: FakeServer) -> None:
    fake.piece_delay_s = 0.002
    async with AsyncClient(fake.url, backoff=FAST) as client:
        s = await client.session()
        fake.tokens = 40
        stream = s.generate("many kills")
        kills = 0
        async for _ in stream:
            if fake.kill_after_deltas is None and kills < 3:
                fake.kill_after_deltas = 3
                kills += 1
        assert stream.text == expected_text("many kills", 40)
        assert s.reconnects >= 2


async def test_resume_refused_fails_inflight_with_retryable_error(fake: FakeServer) -> None:
    fake.kill_after_deltas = 3
    fake.forget_on_kill = True
    async with AsyncClient(fake.url, backoff=FAST) as client:
        s = await client.session()
        old_id = s.id
        stream = s.generate("lost")
        with pytest.raises(SluiceError) as lost:
            async for _ in stream:
                pass
        assert lost.value.retryable and lost.value.code is ErrorCode.UPSTREAM_UNAVAILABLE
        assert s.id != old_id and s.status == "connected"
        again = await s.generate("lost")
        assert again.text == expected_text("lost", 12)


async def test_goaway_reconnects_and_resumes(fake: FakeServer) -> None:
    fake.piece_delay_s = 0.01
    async with AsyncClient(fake.url, backoff=FAST) as client:
        s = await client.session()
        stream = s.generate("draining")
        async for _ in stream:
            if len(stream.text.split()) == 2:
                fake.goaway(retry_after_ms=30)
        assert stream.text == expected_text("draining", 12)
        assert s.reconnects == 1 and fake.ws_connections == 2


async def test_unreachable_server_fails_fast() -> None:
    with FakeServer() as gone:
        url = gone.url
    with pytest.raises(SluiceError) as failure:
        await sluice_client.connect(url, backoff=FAST, open_timeout=2)
    assert failure.value.code is ErrorCode.UPSTREAM_UNAVAILABLE and failure.value.retryable


async def test_giving_up_fails_inflight_then_reconnects_on_demand() -> None:
    backoff = sluice_client.Backoff(initial_s=0.02, max_s=0.05, give_up_after_s=0.3)
    server = FakeServer(piece_delay_s=0.02).start()
    port = server.ws_port
    s = await sluice_client.connect(server.url, backoff=backoff)
    try:
        stream = s.generate("abandoned")
        await _until(lambda: bool(server.received_of(Generate)))
        await asyncio.sleep(0.05)  # a few pieces out of twelve, 20 ms apart
        await asyncio.to_thread(server.stop)
        with pytest.raises(SluiceError) as gave_up:
            await stream
        assert gave_up.value.retryable and gave_up.value.code is ErrorCode.UPSTREAM_UNAVAILABLE
        assert await _until(lambda: s.status == "disconnected")
        old_id = s.id
        # The server is back on the same port (restarted: it knows no sessions). The next request
        # reconnects by itself, into a new session.
        with FakeServer(port=port) as restarted:
            result = await s.generate("after restart")
            assert result.text == expected_text("after restart", 12)
            assert s.status == "connected" and s.id != old_id
            assert restarted.hellos[-1].session == old_id
    finally:
        await s.close()


async def test_session_repr_names_id_models_and_inflight(fake: FakeServer) -> None:
    fake.piece_delay_s = 0.05
    async with AsyncClient(fake.url, backoff=FAST) as client:
        s = await client.session()
        stream = s.generate("slow")
        text = repr(s)
        assert s.id in text and "fake-gen" in text and "1 in flight" in text and stream.id in text
        html = s._repr_html_()
        assert "<table>" in html and s.id in html and "fake-embed" in html
        await stream.cancel()
        assert "0 in flight" in repr(s)


async def test_request_lost_in_transit_is_sent_again(fake: FakeServer) -> None:
    fake.drop_requests = 1
    async with AsyncClient(fake.url, backoff=FAST) as client:
        s = await client.session()
        result = await s.generate("lost on the way")
        assert result.text == expected_text("lost on the way", 12)
        assert s.reconnects == 1 and len(fake.received_of(Generate)) == 1


async def test_request_the_server_had_is_not_run_twice(fake: FakeServer) -> None:
    fake.kill_on_request = 1
    fake.piece_delay_s = 0.3  # no output before the client is back: it cannot know the server has it
    fake.tokens = 3
    async with AsyncClient(fake.url, backoff=FAST) as client:
        s = await client.session()
        result = await s.generate("already there")
        assert result.text == expected_text("already there", 3)
        # Sent twice (the client could not know), refused as a duplicate, run once.
        assert len(fake.received_of(Generate)) == 2 and s.reconnects == 1


async def test_session_taken_over_stops_the_client(fake: FakeServer) -> None:
    fake.close_after_deltas = (2, 4009)
    async with AsyncClient(fake.url, backoff=FAST) as client:
        s = await client.session()
        with pytest.raises(SluiceError) as taken:
            await s.generate("mine")
        assert taken.value.code is ErrorCode.CANCELLED and not taken.value.retryable
        assert s.status == "closed" and fake.ws_connections == 1
        with pytest.raises(SluiceError):
            s.generate("after")


async def test_slow_consumer_close_reconnects_and_resumes(fake: FakeServer) -> None:
    fake.close_after_deltas = (3, 4008)
    async with AsyncClient(fake.url, backoff=FAST) as client:
        s = await client.session()
        result = await s.generate("resumable")
        assert result.text == expected_text("resumable", 12) and s.reconnects == 1
