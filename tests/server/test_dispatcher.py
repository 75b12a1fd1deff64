"""The dispatcher (server/dispatcher.py) used directly, without a session, as the HTTP APIs use it."""

from __future__ import annotations

import asyncio
import base64
from contextlib import aclosing

import numpy as np
import pytest

from protocol.errors import ErrorCode, SluiceError
from protocol.messages import ChatMessage, Classify, Embed, Generate
from server.dispatcher import Dispatcher, Finished, encode_vectors, generation_request
from server.draining import DrainState
from server.metrics import Metrics
from server.ratelimit import RateLimiter
from server.settings import Settings
from tests.server.fakes import FakeRegistry, ScriptedGenerator


def make(registry: FakeRegistry | None = None, **settings: object) -> tuple[Dispatcher, Metrics]:
    metrics = Metrics()
    config = Settings(**settings)  # type: ignore[arg-type]
    return Dispatcher(registry or FakeRegistry(), limiter=RateLimiter(config), metrics=metrics), metrics


def scrape(metrics: Metrics) -> str:
    return metrics.render()[0].decode()


async def test_generate_streams_pieces_then_finished_with_measured_timings() -> None:
    dispatcher, metrics = make(FakeRegistry(ScriptedGenerator(pieces=["a", "", "b"], delay_s=0.01)))
    message = Generate(type="generate", id="x", prompt="hi")
    items = [item async for item in dispatcher.generate(message, key_id="k")]
    assert items[:2] == ["a", "b"]  # empty pieces are not passed on
    finished = items[-1]
    assert isinstance(finished, Finished)
    assert finished.model == "fake-gen" and finished.finish_reason == "stop"
    assert finished.usage.prompt_tokens == 3 and finished.usage.completion_tokens == 3
    timings = finished.timings
    assert timings.ttft_ms is not None
    assert 0 <= timings.queue_ms <= timings.ttft_ms <= timings.total_ms
    assert timings.total_ms >= 20  # three paced pieces really took time
    text = scrape(metrics)
    assert 'sluice_requests_total{kind="generate",outcome="done"} 1.0' in text
    assert 'sluice_generated_tokens_total{model="fake-gen"} 2.0' in text


async def test_closing_the_stream_early_closes_the_backend_and_counts_a_cancel() -> None:
    generator = ScriptedGenerator(pieces=["a", "b", "c", "d"], delay_s=0.01)
    dispatcher, metrics = make(FakeRegistry(generator))
    stream = dispatcher.generate(Generate(type="generate", id="x", prompt="hi"), key_id="k")
    async with aclosing(stream):
        async for _item in stream:
            break
    assert generator.records[0].closed_early
    assert 'outcome="cancelled"} 1.0' in scrape(metrics)


async def test_cancelling_the_task_stops_the_backend() -> None:
    generator = ScriptedGenerator(pieces=["a"] * 100, delay_s=0.01)
    dispatcher, _ = make(FakeRegistry(generator))

    async def consume() -> None:
        async for _item in dispatcher.generate(Generate(type="generate", id="x", prompt="hi"), key_id="k"):
            pass

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert generator.records[0].closed_early and generator.records[0].sent < 100


async def test_unknown_model_and_unexpected_errors_are_sluice_errors() -> None:
    broken = ScriptedGenerator(fail_after=0, fail_with=KeyError("boom"))
    dispatcher, metrics = make(FakeRegistry(broken))
    with pytest.raises(SluiceError) as missing:
        await dispatcher.embed(Embed(type="embed", id="e", input="x", model="nope"), key_id="k")
    assert missing.value.code is ErrorCode.MODEL_NOT_FOUND
    with pytest.raises(SluiceError) as internal:
        async for _item in dispatcher.generate(Generate(type="generate", id="x", prompt="hi"), key_id="k"):
            pass
    assert internal.value.code is ErrorCode.INTERNAL and "boom" not in internal.value.message
    text = scrape(metrics)
    assert 'outcome="model_not_found"} 1.0' in text and 'outcome="internal"} 1.0' in text


async def test_embed_float_and_base64_carry_the_same_vectors() -> None:
    dispatcher, _ = make()
    floats = await dispatcher.embed(Embed(type="embed", id="e", input=["ab", "c"]), key_id="k")
    packed = await dispatcher.embed(
        Embed(type="embed", id="e", input=["ab", "c"], encoding="base64"), key_id="k"
    )
    assert floats.model == "fake-embed" and floats.dimensions == 4
    assert floats.embeddings == [[2.0, 1.0, -2.5, 0.125], [1.0, 1.0, -2.5, 0.125]]
    decoded = [np.frombuffer(base64.b64decode(text), dtype="<f4").tolist() for text in packed.embeddings]  # type: ignore[arg-type]
    assert decoded == floats.embeddings


def test_base64_is_little_endian_float32_whatever_the_input_order() -> None:
    big = np.array([[1.5, -2.0]], dtype=">f4")
    assert encode_vectors(big, "base64") == [
        base64.b64encode(np.array([1.5, -2.0], "<f4").tobytes()).decode()
    ]


async def test_classify_results_per_input() -> None:
    dispatcher, _ = make()
    result = await dispatcher.classify(
        Classify(type="classify", id="c", input=["a", "b"], labels=["x", "y", "z"]), key_id="k"
    )
    assert result.model == "fake-cls" and len(result.results) == 2
    assert [score.label for score in result.results[0]] == ["x", "y", "z"]


async def test_admit_counts_requests_and_refuses_while_draining() -> None:
    drain = DrainState()
    dispatcher = Dispatcher(
        FakeRegistry(), limiter=RateLimiter(Settings(requests_per_minute=1)), metrics=Metrics(), drain=drain
    )
    dispatcher.admit("k")
    with pytest.raises(SluiceError) as limited:
        dispatcher.admit("k")
    assert limited.value.code is ErrorCode.RATE_LIMITED
    dispatcher.admit("other")
    drain.begin()
    with pytest.raises(SluiceError) as draining:
        dispatcher.admit("third")
    assert draining.value.code is ErrorCode.SHUTTING_DOWN


def test_generation_request_shapes() -> None:
    plain = generation_request("m", Generate(type="generate", id="x", prompt="hi", system="sys"))
    assert plain.prompt == "hi" and plain.system == "sys" and plain.messages is None
    chat = generation_request(
        "m",
        Generate(
            type="generate",
            id="x",
            messages=[ChatMessage(role="user", content="q")],
            system="sys",
            options={"max_tokens": 5, "stop": ["."]},  # type: ignore[arg-type]
        ),
    )
    assert chat.messages is not None
    assert [(t.role, t.content) for t in chat.messages] == [("system", "sys"), ("user", "q")]
    assert chat.options.max_tokens == 5 and chat.options.stop == (".",)
