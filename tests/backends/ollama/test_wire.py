"""The Ollama client's pure parts: wire format, error translation, URL choice, stall guard."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import orjson
import pytest

from protocol.errors import INTERNAL_MESSAGE, ErrorCode, SluiceError
from server.backends.base import GenerationRequest, SamplingOptions, Tool, ToolCall, ToolChoice, Turn
from server.backends.ollama.errors import (
    MalformedResponse,
    NoUpstream,
    StreamEnded,
    StreamStalled,
    UpstreamErrorLine,
    UpstreamStatus,
    retry_after_ms,
    translate,
)
from server.backends.ollama.guard import StallGuard
from server.backends.ollama.pool import UpstreamPool
from server.backends.ollama.wire import (
    StreamDecoder,
    decode_embed,
    decode_tags,
    encode_generation,
    offered_tools,
    result_from_final,
)


def chat_line(text: str, **extra: object) -> bytes:
    chunk = {"model": "m", "created_at": "t", "message": {"role": "assistant", "content": text}}
    return orjson.dumps(chunk | {"done": False} | extra) + b"\n"


def generate_line(text: str, **extra: object) -> bytes:
    return orjson.dumps({"model": "m", "created_at": "t", "response": text, "done": False} | extra) + b"\n"


FINAL = {"done": True, "done_reason": "stop", "eval_count": 3, "prompt_eval_count": 5}
PIECES = ["Grüß", " 東京", " ✓"]
CHAT_BODY = b"".join(chat_line(p) for p in PIECES) + chat_line("", **FINAL)
GENERATE_BODY = b"".join(generate_line(p) for p in PIECES) + generate_line("", **FINAL)


def decode(body: bytes, cuts: list[int], *, chat: bool) -> tuple[str, dict[str, object]]:
    decoder = StreamDecoder(chat=chat)
    text, start = "", 0
    for cut in [*cuts, len(body)]:
        text += decoder.feed(body[start:cut])
        start = cut
    return text, decoder.finish()


# --- StreamDecoder ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("body", "chat"), [(CHAT_BODY, True), (GENERATE_BODY, False)])
def test_decoder_gives_the_same_text_wherever_the_reads_split(body: bytes, chat: bool) -> None:
    whole = decode(body, [], chat=chat)
    assert whole[0] == "".join(PIECES)
    assert whole[1]["done"] is True
    for cut in range(1, len(body)):  # every cut, UTF-8 characters and newlines included
        assert decode(body, [cut], chat=chat) == whole
    assert decode(body, list(range(1, len(body))), chat=chat) == whole  # byte by byte


def test_decoder_joins_the_lines_of_one_read_and_counts_pieces() -> None:
    decoder = StreamDecoder(chat=False)
    assert decoder.feed(GENERATE_BODY) == "".join(PIECES)
    assert decoder.pieces == 3
    assert decoder.finish()["eval_count"] == 3


def test_decoder_skips_blank_lines_and_accepts_a_last_line_without_newline() -> None:
    decoder = StreamDecoder(chat=False)
    assert decoder.feed(b"\n\r\n" + generate_line("a") + b"  \n") == "a"
    assert decoder.feed(generate_line("", **FINAL).rstrip(b"\n")) == ""
    assert decoder.finish()["done_reason"] == "stop"


def test_error_line_raises_with_ollamas_message() -> None:
    decoder = StreamDecoder(chat=True)
    with pytest.raises(UpstreamErrorLine) as caught:
        decoder.feed(b'{"error":"out of memory"}\n')
    assert caught.value.error == "out of memory"


def test_text_before_an_error_line_in_the_same_read_is_kept() -> None:
    decoder = StreamDecoder(chat=False)
    assert decoder.feed(generate_line("kept") + b'{"error":"boom"}\n') == "kept"
    assert isinstance(decoder.failure, UpstreamErrorLine)
    with pytest.raises(UpstreamErrorLine):
        decoder.finish()


@pytest.mark.parametrize("line", [b"not json\n", b"[1, 2]\n", b'{"response": 5}\n'])
def test_malformed_lines_raise(line: bytes) -> None:
    with pytest.raises((MalformedResponse, orjson.JSONDecodeError)) as caught:
        StreamDecoder(chat=False).feed(line)
    assert translate(caught.value).code is ErrorCode.UPSTREAM_ERROR


def test_stream_without_final_line_raises_stream_ended() -> None:
    decoder = StreamDecoder(chat=False)
    decoder.feed(generate_line("half"))
    with pytest.raises(StreamEnded):
        decoder.finish()


# --- request bodies and results -----------------------------------------------------------------------


def test_generate_body() -> None:
    options = SamplingOptions(temperature=0.0, top_p=1.0, top_k=1, max_tokens=0, stop=("a", "b"), seed=0)
    path, raw = encode_generation(GenerationRequest("m", prompt="p", system="s", options=options))
    assert path == "/api/generate"
    assert orjson.loads(raw) == {
        "model": "m",
        "stream": True,
        "prompt": "p",
        "system": "s",
        "options": {
            "num_predict": 0,
            "stop": ["a", "b"],
            "seed": 0,
            "temperature": 0.0,
            "top_p": 1.0,
            "top_k": 1,
        },
    }


def test_chat_body_without_options() -> None:
    path, raw = encode_generation(GenerationRequest("m", messages=(Turn("user", "u"),), format="json"))
    assert path == "/api/chat"
    assert orjson.loads(raw) == {
        "model": "m",
        "stream": True,
        "messages": [{"role": "user", "content": "u"}],
        "format": "json",
    }


@pytest.mark.parametrize(
    ("reason", "finish"),
    [("stop", "stop"), ("length", "length"), ("load", "stop"), ("unload", "stop"), (None, "stop")],
)
def test_done_reason(reason: str | None, finish: str) -> None:
    assert result_from_final({"done": True, "done_reason": reason}, 0).finish_reason == finish


def test_final_chunk_nanoseconds_become_milliseconds() -> None:
    final = {
        "done": True,
        "done_reason": "stop",
        "total_duration": 5_000_000_000,
        "load_duration": 2_500_000,
        "prompt_eval_count": 26,
        "prompt_eval_duration": 130_000_000,
        "eval_count": 290,
        "eval_duration": 4_000_000_000,
    }
    result = result_from_final(final, pieces=7)
    assert (result.prompt_tokens, result.completion_tokens) == (26, 290)
    assert (result.total_ms, result.load_ms, result.prompt_eval_ms, result.eval_ms) == (
        5000.0,
        2.5,
        130.0,
        4000.0,
    )


def test_missing_counts_fall_back_to_pieces() -> None:
    result = result_from_final({"done": True, "eval_count": "x", "prompt_eval_count": True}, pieces=7)
    assert (result.prompt_tokens, result.completion_tokens) == (0, 7)
    assert result.total_ms is None


def test_embed_and_tags_answers() -> None:
    matrix = decode_embed(b'{"embeddings": [[1, 0], [0.5, 0.25]]}', 2)
    assert matrix.dtype.name == "float32" and matrix.shape == (2, 2)
    for bad in (
        b'{"embeddings": [[1, 0]]}',
        b'{"embeddings": [[1], [1, 2]]}',
        b"{}",
        b'{"embeddings": [1, 2]}',
    ):
        with pytest.raises(MalformedResponse):
            decode_embed(bad, 2)
    assert decode_tags(b'{"models": [{"name": "a"}, {"model": "b"}, {"size": 1}, 3]}') == ["a", "b"]
    with pytest.raises(MalformedResponse):
        decode_tags(b'{"tags": []}')


# --- translate ----------------------------------------------------------------------------------------

REQUEST = httpx.Request("POST", "http://127.0.0.1:1/api/chat")


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (UpstreamStatus(404, "model not found", None), ErrorCode.MODEL_NOT_FOUND),
        (UpstreamStatus(503, None, 1000), ErrorCode.OVERLOADED),
        (UpstreamStatus(429, None, None), ErrorCode.RATE_LIMITED),
        (UpstreamStatus(400, "bad", None), ErrorCode.INVALID_REQUEST),
        (UpstreamStatus(401, "no", None), ErrorCode.UPSTREAM_ERROR),
        (UpstreamStatus(499, None, None), ErrorCode.UPSTREAM_ERROR),
        (UpstreamStatus(500, "crash", None), ErrorCode.UPSTREAM_ERROR),
        (UpstreamStatus(502, None, None), ErrorCode.UPSTREAM_UNAVAILABLE),
        (UpstreamErrorLine("boom"), ErrorCode.UPSTREAM_ERROR),
        (StreamStalled("first_token", 1.0), ErrorCode.TIMEOUT),
        (StreamStalled("idle", 1.0), ErrorCode.TIMEOUT),
        (StreamEnded(), ErrorCode.UPSTREAM_UNAVAILABLE),
        (NoUpstream(), ErrorCode.UPSTREAM_UNAVAILABLE),
        (MalformedResponse(), ErrorCode.UPSTREAM_ERROR),
        (httpx.ConnectTimeout("secret detail", request=REQUEST), ErrorCode.TIMEOUT),
        (httpx.ReadTimeout("secret detail", request=REQUEST), ErrorCode.TIMEOUT),
        (httpx.PoolTimeout("secret detail", request=REQUEST), ErrorCode.OVERLOADED),
        (httpx.ConnectError("secret detail", request=REQUEST), ErrorCode.UPSTREAM_UNAVAILABLE),
        (httpx.ReadError("secret detail", request=REQUEST), ErrorCode.UPSTREAM_UNAVAILABLE),
        (httpx.RemoteProtocolError("secret detail", request=REQUEST), ErrorCode.UPSTREAM_UNAVAILABLE),
        (ValueError("secret detail"), ErrorCode.INTERNAL),
        (KeyError("secret detail"), ErrorCode.INTERNAL),
    ],
)
def test_translate(exc: Exception, code: ErrorCode) -> None:
    error = translate(exc, model="m")
    assert error.code is code
    assert "secret detail" not in error.message
    if code is ErrorCode.INTERNAL:
        assert error.message == INTERNAL_MESSAGE


def test_translate_keeps_sluice_errors_and_clips_upstream_text() -> None:
    original = SluiceError(ErrorCode.CANCELLED, "x")
    assert translate(original) is original
    long = translate(UpstreamErrorLine("e" * 5000))
    assert len(long.message) <= 200 and long.message.startswith("eee")
    assert translate(UpstreamStatus(503, None, 1500)).retry_after_ms == 1500


def test_retry_after() -> None:
    assert retry_after_ms("3") == 3000
    assert retry_after_ms(None) is None
    assert retry_after_ms("soon") is None
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    ms = retry_after_ms(later)
    assert ms is not None and 25_000 <= ms <= 31_000


# --- UpstreamPool -------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_pool_prefers_the_least_busy_and_shares_ties() -> None:
    pool = UpstreamPool(["http://a/", "http://b", "http://c"], retry_unhealthy_s=5, clock=Clock())
    a, b, c = pool.upstreams
    assert a.url == "http://a"
    a.inflight, b.inflight, c.inflight = 3, 1, 2
    assert pool.candidates() == [b, c, a]
    a.inflight = b.inflight = c.inflight = 0
    firsts = {pool.candidates()[0].url for _ in range(3)}
    assert firsts == {"http://a", "http://b", "http://c"}


def test_pool_skips_unhealthy_until_the_retry_time() -> None:
    clock = Clock()
    pool = UpstreamPool(["http://a", "http://b"], retry_unhealthy_s=5, clock=clock)
    a, b = pool.upstreams
    pool.connect_failed(a)
    assert pool.candidates() == [b]
    clock.now += 4.9
    assert pool.candidates() == [b]
    clock.now += 0.2
    assert a in pool.candidates()
    pool.connect_failed(a)
    clock.now += 1
    pool.connect_failed(b)
    assert pool.candidates() == [a]  # none healthy: one try, on the one whose quarantine ends first
    pool.answered(a)
    assert pool.status()["http://a"] == {"healthy": True, "inflight": 0, "failures": 0}
    assert pool.status()["http://b"]["healthy"] is False


def test_pool_with_one_or_no_url() -> None:
    assert UpstreamPool([], retry_unhealthy_s=1).candidates() == []
    single = UpstreamPool(["http://a"], retry_unhealthy_s=1)
    single.connect_failed(single.upstreams[0])
    assert single.candidates() == single.upstreams


# --- StallGuard ---------------------------------------------------------------------------------------


async def test_guard_turns_a_stall_into_a_timeout_and_undoes_its_cancel() -> None:
    guard = StallGuard(first_token_s=0.05, idle_s=10)
    guard.start()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.sleep(1)
    stall = guard.expired()
    assert stall is not None and stall.phase == "first_token"
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
    guard.stop()
    await asyncio.sleep(0.01)  # the task was not left cancelled


async def test_guard_idle_phase_and_paused_while_the_consumer_holds_a_piece() -> None:
    guard = StallGuard(first_token_s=10, idle_s=0.05)
    guard.start()
    guard.first_piece()
    guard.received()
    await asyncio.sleep(0.15)  # "at yield": not waiting on upstream, so no timeout
    guard.waiting()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.sleep(1)
    stall = guard.expired()
    assert stall is not None and stall.phase == "idle"
    guard.stop()


async def test_guard_leaves_a_cancel_from_outside_alone() -> None:
    async def reader() -> StreamStalled | None:
        guard = StallGuard(first_token_s=10, idle_s=10)
        guard.start()
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            assert guard.expired() is None
            raise
        finally:
            guard.stop()
        return None

    task = asyncio.create_task(reader())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


# --- tools and format -----------------------------------------------------------------------------------

WEATHER = Tool(
    "get_weather", "weather of a city", {"type": "object", "properties": {"city": {"type": "string"}}}
)
CLOCK = Tool("now")


def body_of(request: GenerationRequest) -> tuple[str, dict[str, object]]:
    path, raw = encode_generation(request)
    return path, orjson.loads(raw)


def test_a_prompt_with_tools_goes_through_chat_with_the_tools_and_format() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    path, body = body_of(
        GenerationRequest("m", prompt="p", system="s", format=schema, tools=(WEATHER, CLOCK))
    )
    assert path == "/api/chat"
    assert body == {
        "model": "m",
        "stream": True,
        "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "p"}],
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": "weather of a city",
                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
                },
            },
            # Ollama's function type needs parameters: none means an empty object.
            {
                "type": "function",
                "function": {"name": "now", "parameters": {"type": "object", "properties": {}}},
            },
        ],
        "format": schema,
    }


def test_tool_choice_decides_what_ollama_is_shown() -> None:
    tools = (WEATHER, CLOCK)
    _, named = body_of(
        GenerationRequest("m", prompt="p", tools=tools, tool_choice=ToolChoice("required", "now"))
    )
    assert [t["function"]["name"] for t in named["tools"]] == ["now"]  # type: ignore[index]
    _, required = body_of(GenerationRequest("m", prompt="p", tools=tools, tool_choice=ToolChoice("required")))
    assert [t["function"]["name"] for t in required["tools"]] == ["get_weather", "now"]  # type: ignore[index]
    # "none": the model cannot call what it is not shown; a prompt then stays on /api/generate.
    path, none = body_of(GenerationRequest("m", prompt="p", tools=tools, tool_choice=ToolChoice("none")))
    assert path == "/api/generate" and "tools" not in none
    assert (
        offered_tools(GenerationRequest("m", prompt="p", tools=tools, tool_choice=ToolChoice("none"))) == ()
    )


def test_tool_calls_and_results_map_into_ollamas_history() -> None:
    turns = (
        Turn("user", "weather and time?"),
        Turn(
            "assistant",
            "",
            tool_calls=(
                ToolCall("get_weather", '{"city":"Oslo"}', id="call_1"),
                ToolCall("now", "{}", id="call_2"),
            ),
        ),
        Turn("tool", "rain", tool_call_id="call_1"),
        Turn("tool", "12:00", tool_call_id="call_2"),
        Turn("tool", "orphan", tool_call_id="call_unknown"),
    )
    _, body = body_of(GenerationRequest("m", messages=turns, tools=(WEATHER, CLOCK)))
    assert body["messages"] == [
        {"role": "user", "content": "weather and time?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}},
                {"function": {"name": "now", "arguments": {}}},
            ],
        },
        {"role": "tool", "content": "rain", "tool_name": "get_weather"},
        {"role": "tool", "content": "12:00", "tool_name": "now"},
        {"role": "tool", "content": "orphan"},
    ]


def call_line(*calls: dict[str, object], content: str = "") -> bytes:
    message = {"role": "assistant", "content": content, "tool_calls": list(calls)}
    return orjson.dumps({"model": "m", "created_at": "t", "message": message, "done": False}) + b"\n"


def test_decoder_collects_complete_calls_with_object_arguments_as_json_text() -> None:
    body = (
        chat_line("Let me look.")
        + call_line({"function": {"index": 0, "name": "get_weather", "arguments": {"city": "Zürich"}}})
        + call_line({"function": {"name": "now", "arguments": {}}}, {"id": "x", "function": {"name": "now"}})
        + chat_line("", **FINAL)
    )
    for cuts in ([], [len(body) // 3], list(range(1, len(body), 7))):
        decoder = StreamDecoder(chat=True)
        text, calls, start = "", [], 0
        for cut in [*cuts, len(body)]:
            text += decoder.feed(body[start:cut])
            calls += decoder.take_calls()
            start = cut
        assert text == "Let me look."
        assert calls == [
            ToolCall("get_weather", '{"city":"Zürich"}'),
            ToolCall("now", "{}"),
            ToolCall("now", "{}"),
        ]
        assert decoder.calls_made == 3 and decoder.take_calls() == []
        assert result_from_final(decoder.finish(), decoder.pieces, called=True).finish_reason == "tool_calls"


@pytest.mark.parametrize(
    "calls",
    [
        "not a list",
        ["not an object"],
        [{"function": "f"}],
        [{"function": {"arguments": {}}}],
        [{"function": {"name": "", "arguments": {}}}],
        [{"function": {"name": "f", "arguments": "{}"}}],  # OpenAI's string, not Ollama's object
    ],
)
def test_malformed_tool_calls_raise(calls: object) -> None:
    message = {"role": "assistant", "content": "", "tool_calls": calls}
    line = orjson.dumps({"message": message, "done": False}) + b"\n"
    with pytest.raises(MalformedResponse):
        StreamDecoder(chat=True).feed(line)


def test_called_keeps_length_and_only_turns_stop_into_tool_calls() -> None:
    assert (
        result_from_final({"done": True, "done_reason": "length"}, 0, called=True).finish_reason == "length"
    )
    assert result_from_final({"done": True, "done_reason": "stop"}, 0).finish_reason == "stop"
