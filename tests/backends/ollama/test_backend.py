"""The Ollama backend end to end: real httpx against the emulator on loopback."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from protocol.errors import ErrorCode, SluiceError
from server.backends.base import GenerationRequest, GenerationResult, SamplingOptions, Turn
from server.backends.ollama.backend import OllamaBackend, OllamaEmbedder
from server.settings import Settings
from tests.support.ollama_emulator import Emulator, RequestRecord, start_emulator

pytestmark = pytest.mark.timeout(60)

MODEL = "llama3.2:1b"


def make_settings(*urls: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "ollama_urls": list(urls),
        "ollama_connect_timeout_s": 2.0,
        "ollama_first_token_timeout_s": 10.0,
        "ollama_idle_timeout_s": 10.0,
        "ollama_retry_unhealthy_s": 30.0,
    }
    return Settings(**(values | overrides))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def collect(ollama: OllamaBackend, request: GenerationRequest) -> tuple[list[str], GenerationResult]:
    pieces: list[str] = []
    results: list[GenerationResult] = []
    async for item in ollama.generate(request):
        if isinstance(item, str):
            assert not results, "text after the result"
            pieces.append(item)
        else:
            results.append(item)
    assert len(results) == 1
    return pieces, results[0]


async def failure(ollama: OllamaBackend, request: GenerationRequest) -> tuple[list[str], SluiceError]:
    pieces: list[str] = []
    with pytest.raises(SluiceError) as caught:
        async for item in ollama.generate(request):
            assert isinstance(item, str)
            pieces.append(item)
    return pieces, caught.value


def only_generation(emu: Emulator) -> RequestRecord:
    records = emu.generations()
    assert len(records) == 1
    return records[0]


# --- streaming the right text, with the options upstream ------------------------------------------------


async def test_generate_streams_the_exact_text_with_options_mapped(
    emu: Emulator, backend: OllamaBackend
) -> None:
    options = SamplingOptions(temperature=0.5, top_p=0.9, top_k=40, max_tokens=100, stop=("zzz",), seed=7)
    request = GenerationRequest(MODEL, prompt="Tell me about rivers", system="Be brief.", options=options)
    pieces, result = await collect(backend, request)

    record = only_generation(emu)
    assert record.path == "/api/generate"
    assert record.body["prompt"] == "Tell me about rivers"
    assert record.body["system"] == "Be brief."
    assert record.body["stream"] is True
    assert record.options == {
        "temperature": 0.5,
        "top_p": 0.9,
        "top_k": 40,
        "num_predict": 100,
        "stop": ["zzz"],
        "seed": 7,
    }
    assert "".join(pieces) == emu.expected_text(record.body)
    assert len(pieces) > 1, "the text must arrive as a stream, not in one piece"
    assert result.finish_reason == "stop"
    assert result.completion_tokens == 16
    assert not record.client_closed_early and record.outcome == "completed"


async def test_chat_puts_the_system_prompt_first(emu: Emulator, backend: OllamaBackend) -> None:
    turns = (Turn("user", "hi"), Turn("assistant", "hello"), Turn("user", "what now?"))
    request = GenerationRequest(MODEL, messages=turns, system="You are terse.", format="json")
    pieces, result = await collect(backend, request)

    record = only_generation(emu)
    assert record.path == "/api/chat"
    assert record.body["messages"] == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "what now?"},
    ]
    assert record.body["format"] == "json"
    assert "options" not in record.body
    assert "".join(pieces) == emu.expected_text(record.body)
    assert result.finish_reason == "stop"


async def test_seed_makes_the_text_and_different_prompts_differ(
    emu: Emulator, backend: OllamaBackend
) -> None:
    seeded = GenerationRequest(MODEL, prompt="same", options=SamplingOptions(seed=1))
    first, _ = await collect(backend, seeded)
    again, _ = await collect(backend, seeded)
    other, _ = await collect(
        backend, GenerationRequest(MODEL, prompt="same", options=SamplingOptions(seed=2))
    )
    assert "".join(first) == "".join(again)
    assert "".join(first) != "".join(other)


@pytest.mark.parametrize(("lines_per_write", "split"), [(1, True), (3, True), (4, False)])
async def test_lines_split_across_writes_and_many_lines_per_write(
    emu: Emulator, backend: OllamaBackend, lines_per_write: int, split: bool
) -> None:
    emu.configure(lines_per_write=lines_per_write, split_lines=split, tokens=40, token_rate=1000)
    request = GenerationRequest(MODEL, prompt="split me", options=SamplingOptions(seed=3))
    pieces, result = await collect(backend, request)
    record = only_generation(emu)
    assert record.writes >= 40 // lines_per_write
    assert "".join(pieces) == emu.expected_text(record.body)
    assert result.completion_tokens == 40


async def test_max_tokens_ends_with_length(emu: Emulator, backend: OllamaBackend) -> None:
    request = GenerationRequest(MODEL, prompt="long", options=SamplingOptions(max_tokens=5))
    pieces, result = await collect(backend, request)
    assert result.finish_reason == "length"
    assert result.completion_tokens == 5
    assert "".join(pieces) == emu.expected_text(only_generation(emu).body)


async def test_usage_and_timings_come_from_the_final_chunk(emu: Emulator, backend: OllamaBackend) -> None:
    emu.configure(token_rate=100, tokens=10, first_token_delay_s=0.05)
    _, result = await collect(backend, GenerationRequest(MODEL, prompt="one two three"))
    assert result.prompt_tokens == 4  # the emulator counts words + 1
    assert result.completion_tokens == 10
    assert result.load_ms == pytest.approx(0.001)  # the emulator reports 1000 ns
    assert result.prompt_eval_ms is not None and result.prompt_eval_ms >= 40  # ~50 ms, in ms not ns
    assert result.eval_ms is not None and 50 <= result.eval_ms < 5000  # 9 intervals of 10 ms
    assert result.total_ms is not None and result.total_ms >= result.eval_ms + result.prompt_eval_ms - 1


async def test_usage_counts_pieces_when_the_final_chunk_has_no_counts(
    emu: Emulator, backend: OllamaBackend
) -> None:
    pieces, result = await collect(backend, GenerationRequest("fault-no-stats", prompt="x"))
    # Pieces that arrive in one read are yielded together, so count the emulator's lines instead.
    assert result.completion_tokens == only_generation(emu).pieces_sent == 16
    assert "".join(pieces) == only_generation(emu).text_sent
    assert result.prompt_tokens == 0
    assert (result.load_ms, result.prompt_eval_ms, result.eval_ms, result.total_ms) == (
        None,
        None,
        None,
        None,
    )


async def test_load_done_reason_becomes_stop(emu: Emulator, backend: OllamaBackend) -> None:
    pieces, result = await collect(backend, GenerationRequest(MODEL, prompt=""))
    assert pieces == []
    assert result.finish_reason == "stop"
    assert result.completion_tokens == 0


async def test_many_concurrent_streams_share_one_pool(emu: Emulator, backend: OllamaBackend) -> None:
    emu.configure(token_rate=200, tokens=20)
    requests = [GenerationRequest(MODEL, prompt=f"stream {i}") for i in range(50)]
    outcomes = await asyncio.gather(*(collect(backend, r) for r in requests))
    by_prompt = {r.body["prompt"]: r for r in emu.generations()}
    for request, (pieces, _) in zip(requests, outcomes, strict=True):
        assert "".join(pieces) == emu.expected_text(by_prompt[request.prompt].body)
    # The emulator counts a stream done after its last write, which can land after the client
    # has read the final line: give its handlers a moment, but every one of them must finish.
    for _ in range(100):
        if emu.busy == 0:
            break
        await asyncio.sleep(0.02)
    assert emu.busy == 0


# --- errors -------------------------------------------------------------------------------------------


async def test_error_line_mid_stream_is_upstream_error(emu: Emulator, backend: OllamaBackend) -> None:
    pieces, error = await failure(backend, GenerationRequest("fault-error-midstream", prompt="x"))
    assert error.code is ErrorCode.UPSTREAM_ERROR
    assert "unexpected EOF" in error.message  # Ollama's own words may pass through
    assert not error.retryable
    record = only_generation(emu)
    assert "".join(pieces) == record.text_sent and record.pieces_sent == 3


async def test_malformed_line_is_upstream_error(backend: OllamaBackend) -> None:
    _, error = await failure(backend, GenerationRequest("fault-malformed", prompt="x"))
    assert error.code is ErrorCode.UPSTREAM_ERROR
    assert "not json" not in error.message


async def test_unknown_model_is_model_not_found(backend: OllamaBackend) -> None:
    pieces, error = await failure(backend, GenerationRequest("no-such-model:7b", prompt="x"))
    assert pieces == []
    assert error.code is ErrorCode.MODEL_NOT_FOUND
    assert "no-such-model:7b" in error.message
    assert not error.retryable


@pytest.mark.parametrize(
    ("model", "code", "retryable", "retry_after_ms"),
    [
        ("fault-503", ErrorCode.OVERLOADED, True, 2000),
        ("fault-429", ErrorCode.RATE_LIMITED, True, 2000),
        ("fault-500", ErrorCode.UPSTREAM_ERROR, False, None),
        ("fault-400", ErrorCode.INVALID_REQUEST, False, None),
    ],
)
async def test_error_statuses(
    backend: OllamaBackend, model: str, code: ErrorCode, retryable: bool, retry_after_ms: int | None
) -> None:
    _, error = await failure(backend, GenerationRequest(model, prompt="x"))
    assert error.code is code
    assert error.retryable is retryable
    assert error.retry_after_ms == retry_after_ms


async def test_busy_upstream_answers_overloaded(emu: Emulator, backend: OllamaBackend) -> None:
    emu.configure(max_parallel=1, token_rate=20, tokens=100)
    first = backend.generate(GenerationRequest(MODEL, prompt="hold"))
    assert isinstance(await anext(first), str)
    try:
        _, error = await failure(backend, GenerationRequest(MODEL, prompt="second"))
        assert error.code is ErrorCode.OVERLOADED and error.retryable
    finally:
        await first.aclose()  # type: ignore[attr-defined]


async def test_dropped_connection_is_upstream_unavailable(emu: Emulator, backend: OllamaBackend) -> None:
    pieces, error = await failure(backend, GenerationRequest("fault-drop", prompt="x"))
    assert error.code is ErrorCode.UPSTREAM_UNAVAILABLE and error.retryable
    assert "".join(pieces) == only_generation(emu).text_sent


async def test_refused_connection_is_upstream_unavailable() -> None:
    ollama = OllamaBackend(make_settings(f"http://127.0.0.1:{free_port()}"))
    try:
        _, error = await failure(ollama, GenerationRequest(MODEL, prompt="x"))
        assert error.code is ErrorCode.UPSTREAM_UNAVAILABLE and error.retryable
    finally:
        await ollama.aclose()


async def test_connect_timeout_is_timeout() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectTimeout("connect timed out", request=request)

    ollama = OllamaBackend(
        make_settings("http://ollama.invalid:11434"), transport=httpx.MockTransport(handler)
    )
    try:
        _, error = await failure(ollama, GenerationRequest(MODEL, prompt="x"))
        assert error.code is ErrorCode.TIMEOUT and error.retryable
        assert "timed out" in error.message and "connect timed out" != error.message
    finally:
        await ollama.aclose()


async def test_hung_stream_times_out_and_closes_upstream(emu: Emulator) -> None:
    ollama = OllamaBackend(make_settings(emu.url, ollama_idle_timeout_s=0.3))
    try:
        pieces: list[str] = []
        with pytest.raises(SluiceError) as caught:
            async for item in ollama.generate(GenerationRequest("fault-hang", prompt="x")):
                assert isinstance(item, str)
                pieces.append(item)
                last = time.monotonic()
        waited = time.monotonic() - last
    finally:
        await ollama.aclose()
    assert caught.value.code is ErrorCode.TIMEOUT
    assert 0.25 <= waited < 5.0  # the 0.3 s timeout, not one of the 10 s ones (a busy machine is late)
    record = only_generation(emu)
    assert "".join(pieces) == record.text_sent
    assert await emu.until(lambda: record.client_closed_early)


@pytest.mark.parametrize("model", ["fault-hang-before-first", "fault-hang-headers"])
async def test_hang_before_first_token_times_out(emu: Emulator, model: str) -> None:
    ollama = OllamaBackend(make_settings(emu.url, ollama_first_token_timeout_s=0.3, ollama_idle_timeout_s=30))
    started = time.monotonic()
    try:
        pieces, error = await failure(ollama, GenerationRequest(model, prompt="x"))
    finally:
        await ollama.aclose()
    assert pieces == []
    assert error.code is ErrorCode.TIMEOUT and error.retryable
    assert 0.25 <= time.monotonic() - started < 5.0  # the 0.3 s timeout, not the 30 s idle one
    record = only_generation(emu)
    assert await emu.until(lambda: record.client_closed_early)


async def test_slow_consumer_is_not_an_idle_upstream(emu: Emulator) -> None:
    """Time the consumer spends holding a piece must not count against the idle timeout."""
    emu.configure(tokens=4, token_rate=0)
    ollama = OllamaBackend(
        make_settings(emu.url, ollama_idle_timeout_s=0.2, ollama_first_token_timeout_s=0.2)
    )
    try:
        pieces: list[str] = []
        async for item in ollama.generate(GenerationRequest(MODEL, prompt="slow reader")):
            if isinstance(item, str):
                pieces.append(item)
                await asyncio.sleep(0.3)
    finally:
        await ollama.aclose()
    assert "".join(pieces) == emu.expected_text(only_generation(emu).body)


# --- cancellation reaches upstream ---------------------------------------------------------------------


async def test_aclose_closes_the_upstream_response_at_once(emu: Emulator, backend: OllamaBackend) -> None:
    emu.configure(token_rate=20, tokens=200)  # ten seconds of text
    stream = backend.generate(GenerationRequest(MODEL, prompt="cancel me"))
    assert isinstance(await anext(stream), str)
    assert isinstance(await anext(stream), str)
    closed = time.monotonic()
    await stream.aclose()  # type: ignore[attr-defined]
    record = only_generation(emu)
    assert await emu.until(lambda: record.client_closed_early)
    assert record.closed_at is not None and record.closed_at - closed < 0.5
    assert record.pieces_sent < 10
    assert backend.status()[emu.url]["inflight"] == 0


async def test_cancelling_the_task_closes_the_upstream_response(
    emu: Emulator, backend: OllamaBackend
) -> None:
    emu.configure(token_rate=20, tokens=200)
    received = asyncio.Event()

    async def consume() -> None:
        async for _ in backend.generate(GenerationRequest(MODEL, prompt="cancel my task")):
            received.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(received.wait(), 5)
    cancelled = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    record = only_generation(emu)
    assert await emu.until(lambda: record.client_closed_early)
    assert record.closed_at is not None and record.closed_at - cancelled < 0.5
    assert record.pieces_sent < 10


async def test_cancel_while_waiting_for_the_first_token(emu: Emulator, backend: OllamaBackend) -> None:
    task = asyncio.create_task(collect(backend, GenerationRequest("fault-hang-before-first", prompt="x")))
    assert await emu.until(lambda: len(emu.generations()) == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    record = only_generation(emu)
    assert await emu.until(lambda: record.client_closed_early)


async def test_completed_streams_leave_their_connections_for_reuse(
    emu: Emulator, backend: OllamaBackend
) -> None:
    emu.configure(tokens=3)
    for i in range(80):
        await collect(backend, GenerationRequest(MODEL, prompt=f"reuse {i}"))
    records = emu.generations()
    assert not any(r.client_closed_early for r in records)
    # Pooled connections are spread over a few dozen pools in turn, but never one per request.
    assert len({r.connection for r in records}) <= 40


# --- several base URLs --------------------------------------------------------------------------------


async def test_requests_go_to_the_least_busy_url() -> None:
    with start_emulator(token_rate=20, tokens=200) as one, start_emulator(token_rate=20, tokens=200) as two:
        ollama = OllamaBackend(make_settings(one.url, two.url))
        streams = [ollama.generate(GenerationRequest(MODEL, prompt=f"p{i}")) for i in range(4)]
        try:
            for stream in streams:
                assert isinstance(await anext(stream), str)
            assert len(one.generations()) == 2 and len(two.generations()) == 2
            assert {url: s["inflight"] for url, s in ollama.status().items()} == {one.url: 2, two.url: 2}
            # One stream ends: the next request goes to its server, now the least busy one.
            await streams[0].aclose()  # type: ignore[attr-defined]
            inflight = {url: s["inflight"] for url, s in ollama.status().items()}
            idler, busier = (one, two) if inflight[one.url] == 1 else (two, one)
            assert inflight == {idler.url: 1, busier.url: 2}
            for extra_count in range(1, 4):  # however ties were broken before
                extra = ollama.generate(GenerationRequest(MODEL, prompt="extra"))
                streams.append(extra)
                assert isinstance(await anext(extra), str)
                assert len(idler.generations()) == 2 + extra_count and len(busier.generations()) == 2
                await extra.aclose()  # type: ignore[attr-defined]
        finally:
            for stream in streams:
                await stream.aclose()  # type: ignore[attr-defined]
            await ollama.aclose()


async def test_unhealthy_url_is_skipped_then_retried() -> None:
    with start_emulator(tokens=4) as live:
        port = free_port()
        dead = f"http://127.0.0.1:{port}"
        ollama = OllamaBackend(make_settings(dead, live.url, ollama_retry_unhealthy_s=0.5))
        try:
            # Every request succeeds: a refused connect moves on to the live server.
            for i in range(4):
                await collect(ollama, GenerationRequest(MODEL, prompt=f"a{i}"))
            assert len(live.generations()) == 4
            assert ollama.status()[dead]["healthy"] is False
            with start_emulator(tokens=4, port=port) as revived:
                for i in range(2):
                    await collect(ollama, GenerationRequest(MODEL, prompt=f"b{i}"))
                assert revived.generations() == []  # still held unhealthy
                await asyncio.sleep(0.6)
                for i in range(4):
                    await collect(ollama, GenerationRequest(MODEL, prompt=f"c{i}"))
                assert len(revived.generations()) >= 1
                assert ollama.status()[dead]["healthy"] is True
        finally:
            await ollama.aclose()


async def test_all_urls_down_is_upstream_unavailable() -> None:
    urls = [f"http://127.0.0.1:{free_port()}" for _ in range(2)]
    ollama = OllamaBackend(make_settings(*urls))
    try:
        _, error = await failure(ollama, GenerationRequest(MODEL, prompt="x"))
        assert error.code is ErrorCode.UPSTREAM_UNAVAILABLE
        assert all(not s["healthy"] for s in ollama.status().values())
        # Still tried (one URL at a time) rather than refused outright.
        _, again = await failure(ollama, GenerationRequest(MODEL, prompt="x"))
        assert again.code is ErrorCode.UPSTREAM_UNAVAILABLE
    finally:
        await ollama.aclose()


async def test_no_url_configured() -> None:
    ollama = OllamaBackend(make_settings())
    try:
        _, error = await failure(ollama, GenerationRequest(MODEL, prompt="x"))
        assert error.code is ErrorCode.UPSTREAM_UNAVAILABLE
    finally:
        await ollama.aclose()


# --- models, probe, embeddings -----------------------------------------------------------------------


async def test_list_models_is_the_union_over_urls() -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    with start_emulator(models=("a:1b", "shared")) as one, start_emulator(models=("b:2b", "shared")) as two:
        ollama = OllamaBackend(make_settings(one.url, two.url, dead))
        try:
            assert await ollama.list_models() == ["a:1b", "b:2b", "shared"]
            assert await ollama.probe() == {one.url: True, two.url: True, dead: False}
        finally:
            await ollama.aclose()
    ollama = OllamaBackend(make_settings(dead))
    try:
        with pytest.raises(SluiceError) as caught:
            await ollama.list_models()
        assert caught.value.code is ErrorCode.UPSTREAM_UNAVAILABLE
    finally:
        await ollama.aclose()


async def test_embed_returns_float32_rows(emu: Emulator, backend: OllamaBackend) -> None:
    texts = ["a river", "a stream", "stone"]
    matrix = await backend.embed("nomic-embed-text", texts)
    assert matrix.dtype == np.float32 and matrix.shape == (3, 16)
    expected = np.asarray([emu.expected_embedding(t) for t in texts], dtype=np.float32)
    np.testing.assert_allclose(matrix, expected, rtol=1e-6)
    (record,) = [r for r in emu.records if r.path == "/api/embed"]
    assert record.body == {"model": "nomic-embed-text", "input": texts}


async def test_embedder_adapter(emu: Emulator, backend: OllamaBackend) -> None:
    embedder = OllamaEmbedder(backend, "ollama/nomic-embed-text")
    assert embedder.dimensions == 0
    matrix = await embedder.embed(["one", "two"], normalize=True)
    assert matrix.shape == (2, 16) and embedder.dimensions == 16
    np.testing.assert_allclose(np.linalg.norm(matrix, axis=1), 1.0, rtol=1e-5)
    assert (await embedder.embed([])).shape == (0, 16)
    assert [r.body["model"] for r in emu.records if r.path == "/api/embed"] == ["nomic-embed-text"]


async def test_embed_errors_are_typed(backend: OllamaBackend) -> None:
    with pytest.raises(SluiceError) as caught:
        await backend.embed("missing-embedder", ["x"])
    assert caught.value.code is ErrorCode.MODEL_NOT_FOUND
    with pytest.raises(SluiceError) as busy:
        await backend.embed("fault-503", ["x"])
    assert busy.value.code is ErrorCode.OVERLOADED and busy.value.retry_after_ms == 2000


async def test_emulator_serves_the_other_endpoints(emu: Emulator) -> None:
    async with httpx.AsyncClient(base_url=emu.url) as client:
        assert (await client.get("/api/version")).json() == {"version": "0.6.2"}
        legacy = (
            await client.post("/api/embeddings", json={"model": "nomic-embed-text", "prompt": "x"})
        ).json()
        assert len(legacy["embedding"]) == 16
        once = await client.post("/api/generate", json={"model": MODEL, "prompt": "whole", "stream": False})
        body = once.json()
        assert body["done"] is True and body["response"] == emu.expected_text({"prompt": "whole"})
        assert (await client.get("/api/ps")).json()["models"][0]["name"] == MODEL
        assert (await client.get("/nowhere")).status_code == 404


async def test_emulator_cuts_lines_across_writes_and_packs_several_per_write(emu: Emulator) -> None:
    emu.configure(token_rate=200, tokens=30, lines_per_write=3)
    reads: list[bytes] = []
    async with (
        httpx.AsyncClient() as client,
        client.stream("POST", emu.url + "/api/generate", json={"model": MODEL, "prompt": "raw"}) as response,
    ):
        assert response.headers["content-type"] == "application/x-ndjson"
        async for data in response.aiter_raw():
            reads.append(data)
    assert len(reads) >= 5
    assert any(not data.endswith(b"\n") for data in reads[:-1])  # a line continues in the next read
    assert any(data.count(b"\n") >= 2 for data in reads)  # several lines in one read
    assert all(b'"done":true' in line for line in b"".join(reads).splitlines()[-1:])


def test_emulator_runs_as_a_process() -> None:
    command = [sys.executable, "-m", "tests.support.ollama_emulator", "--port", "0", "--tokens", "5"]
    root = Path(__file__).resolve().parents[3]
    with subprocess.Popen(command, cwd=root, stdout=subprocess.PIPE, text=True) as process:
        try:
            assert process.stdout is not None
            line = process.stdout.readline()
            assert line.startswith("listening on http://127.0.0.1:")
            url = line.split()[-1]
            body = {"model": MODEL, "prompt": "p", "stream": False}
            answer = httpx.post(url + "/api/generate", json=body, timeout=10).json()
            assert answer["eval_count"] == 5 and answer["done_reason"] == "stop"
        finally:
            process.send_signal(signal.SIGTERM)
            assert process.wait(10) == 0
