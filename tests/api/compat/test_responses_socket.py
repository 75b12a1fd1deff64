"""The Responses API's WebSocket mode (``client.responses.connect()``), driven by the real ``openai``
SDK against a real server whose Ollama is the emulator (exact texts): one response streamed, two
lanes interleaved with FIFO inside a lane, bad events answered with ``error`` on a socket that
stays usable, auth, an unstored response continued on its own socket only, the key's rate limit
shared with ``POST``, the bounds on lanes and running responses, a function-tool round trip, a
closed socket cancelling its response, the SDK's reconnection (a cut socket, a new one, the
completed response kept); and, from the inside, a write stuck past the stall limit."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from types import SimpleNamespace
from typing import Any, cast

import jsonschema
import openai
import pytest
import websockets
from openai.resources.responses.responses import AsyncResponsesConnection

from protocol.close import CloseCode
from server.api.compat.responses_socket import MAX_ACTIVE, MAX_LANES, MAX_QUEUED, _Connection, _Gone
from server.metrics import Metrics
from tests.api.compat.conftest import text_response_events, upstream_body
from tests.api.compat.test_openai_tools import PARAMETERS
from tests.api.conftest import MODEL, sluice
from tests.reliability.links import reset
from tests.support.ollama_emulator import Emulator
from tests.support.server import ServerProcess

pytestmark = pytest.mark.timeout(120)

WEATHER: Any = {"type": "function", "name": "get_weather", "parameters": PARAMETERS, "strict": True}
TERMINAL = {"response.completed", "response.incomplete", "response.failed"}
KEY, LIMITED_KEY = "socket-key", "socket-key-limited"
REQUESTS_PER_MINUTE = 3
Connection = AsyncResponsesConnection


@pytest.fixture
async def client(base_url: str) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0) as sdk:
        yield sdk


def _events(connection: Connection) -> AsyncIterator[Any]:
    """The connection's events, as the SDK iterates them (reconnecting when it was asked to)."""
    return aiter(connection)


async def _until_terminal(events_in: AsyncIterator[Any], lanes: dict[str | None, int]) -> list[Any]:
    """Every event received until each lane in ``lanes`` saw that many terminals (or errors)."""
    left = dict(lanes)
    events: list[Any] = []
    async with asyncio.timeout(30):
        while any(left.values()):
            event = await anext(events_in)
            events.append(event)
            lane = getattr(event, "stream_id", None)
            if event.type in TERMINAL or event.type == "error":
                assert left.get(lane, 0) > 0, f"an unexpected end in lane {lane!r}: {event}"
                left[lane] -= 1
    return events


def _body_for(replies: Emulator, user_text: str) -> dict[str, Any]:
    """The upstream body whose last user message is ``user_text``."""
    (body,) = [
        record.body
        for record in replies.generations()
        if isinstance(record.body, dict) and record.body["messages"][-1]["content"] == user_text
    ]
    return body


async def test_one_response_streamed_to_completion(client: openai.AsyncOpenAI, replies: Emulator) -> None:
    async with client.responses.connect() as connection:
        incoming = _events(connection)
        await connection.response.create(model=MODEL, input="Say hello", instructions="Be brief")
        events = await _until_terminal(incoming, {None: 1})
    sent = upstream_body(replies)
    assert sent["messages"] == [
        {"role": "system", "content": "Be brief"},
        {"role": "user", "content": "Say hello"},
    ]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    kinds = [event.type for event in events]
    deltas = kinds.count("response.output_text.delta")
    assert deltas >= 1 and kinds == text_response_events(deltas)
    assert all(getattr(event, "stream_id", None) is None for event in events)  # the default lane
    text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    final = events[-1].response
    assert text == replies.expected_text(sent) == final.output_text
    assert final.status == "completed" and final.usage is not None and final.usage.output_tokens > 0
    stored = await client.responses.retrieve(final.id)  # stored as over HTTP
    assert stored.status == "completed" and stored.output_text == text


async def test_two_lanes_interleave_and_each_lane_is_fifo(
    client: openai.AsyncOpenAI, replies: Emulator, paced: Callable[..., None]
) -> None:
    paced(token_rate=100.0, tokens=60)  # 0.6 s each: the two lanes overlap
    async with client.responses.connect() as connection:
        incoming = _events(connection)
        await connection.response.create(model=MODEL, input="Lane a, first", stream_id="a")
        await connection.response.create(model=MODEL, input="Lane b, only", stream_id="b")
        await connection.response.create(model=MODEL, input="Lane a, second", stream_id="a")
        events = await _until_terminal(incoming, {"a": 2, "b": 1})
    lanes: dict[str, list[Any]] = {"a": [], "b": []}
    for event in events:
        lanes[event.stream_id].append(event)  # every event names its lane
    # Lane a: its first response ends before its second begins.
    created = [event.response.id for event in lanes["a"] if event.type == "response.created"]
    ends = [index for index, event in enumerate(lanes["a"]) if event.type in TERMINAL]
    assert len(created) == 2 and ends == [ends[0], len(lanes["a"]) - 1]
    first, second = lanes["a"][: ends[0] + 1], lanes["a"][ends[0] + 1 :]
    # Concurrent across lanes: b started before a's first response ended.
    b_start = events.index(lanes["b"][0])
    assert b_start < events.index(first[-1])
    for stream, user_text in (
        (first, "Lane a, first"),
        (second, "Lane a, second"),
        (lanes["b"], "Lane b, only"),
    ):
        assert [event.sequence_number for event in stream] == list(range(len(stream)))
        ids = {event.item_id for event in stream if event.type == "response.output_text.delta"}
        text = "".join(event.delta for event in stream if event.type == "response.output_text.delta")
        assert len(ids) == 1 and text == replies.expected_text(_body_for(replies, user_text))
        assert stream[-1].type == "response.completed" and stream[-1].response.output_text == text


async def test_bad_events_get_errors_and_the_socket_stays_usable(
    client: openai.AsyncOpenAI, replies: Emulator
) -> None:
    bad: list[tuple[str, str | None, str | None, str | None]] = [
        # frame, param, code, stream_id echoed
        ("not json", None, "invalid_message", None),
        ("[1, 2]", None, "invalid_message", None),
        ('{"type": "response.inject", "response_id": "resp_x", "input": []}', "type", "unknown_type", None),
        ('{"type": "session.update"}', "type", "unknown_type", None),
        (
            '{"type": "response.create", "stream_id": "bad id!", "input": "x"}',
            "stream_id",
            "invalid_request",
            None,
        ),
    ]
    creates: list[tuple[dict[str, Any], str]] = [
        ({"temperature": 5}, "temperature"),
        ({"background": True}, "background"),
        ({"stream": False}, "stream"),
        ({"generate": False}, "generate"),
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"previous_response_id": "resp_unknown"}, "previous_response_id"),
    ]
    async with client.responses.connect() as connection:
        incoming = _events(connection)
        for frame, param, code, lane in bad:
            await connection.send_raw(frame)
            (error,) = await _until_terminal(incoming, {lane: 1})
            assert error.type == "error" and error.status in (400, 422), error
            assert error.error.param == param and error.error.code == code
            assert error.error.type == "invalid_request_error" and error.stream_id == lane
        for fields, param in creates:
            event = {"type": "response.create", "model": MODEL, "input": "Hello", "stream_id": "x", **fields}
            await connection.send_raw(json.dumps(event))
            (error,) = await _until_terminal(incoming, {"x": 1})
            assert error.type == "error" and error.status == 400 and error.stream_id == "x"
            assert error.error.param == param and error.error.type == "invalid_request_error", error
        await connection.response.steer(input="Go on", previous_response_id="resp_unknown")
        steer = await anext(incoming)
        assert steer.type == "response.steer.failed" and steer.error.code == "steering_not_supported"
        assert steer.steer.previous_response_id == "resp_unknown"
        await connection.response.create(model=MODEL, input="Still there?", stream_id="x")
        events = await _until_terminal(incoming, {"x": 1})
    assert events[-1].type == "response.completed"
    assert events[-1].response.output_text == replies.expected_text(upstream_body(replies))


@pytest.fixture(scope="module")
def keyed(emulator: Emulator) -> Iterator[ServerProcess]:
    env = {
        "SLUICE_OLLAMA_URLS": emulator.url,
        "SLUICE_API_KEYS": f"{KEY},{LIMITED_KEY}",
        "SLUICE_REQUESTS_PER_MINUTE": str(REQUESTS_PER_MINUTE),
    }
    with sluice(env) as process:
        yield process


async def test_a_bad_key_or_origin_is_refused_at_the_handshake(
    keyed: ServerProcess, replies: Emulator
) -> None:
    base = f"{keyed.url}/v1"
    async with openai.AsyncOpenAI(base_url=base, api_key="wrong", max_retries=0) as wrong:
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with wrong.responses.connect():
                pass
    answer = refused.value.response
    assert answer.status_code == 401
    assert json.loads(answer.body)["error"]["code"] == "unauthorized"
    headers = {"Authorization": f"Bearer {KEY}", "Origin": "https://elsewhere.example"}
    ws_url = keyed.url.replace("http://", "ws://", 1) + "/v1/responses"
    with pytest.raises(websockets.InvalidStatus) as foreign:  # a foreign page, with a right key
        async with websockets.connect(ws_url, additional_headers=headers):
            pass
    assert foreign.value.response.status_code == 403
    async with (
        openai.AsyncOpenAI(base_url=base, api_key=KEY, max_retries=0) as right,
        right.responses.connect() as connection,
    ):
        incoming = _events(connection)
        await connection.response.create(model=MODEL, input="Authorized")
        events = await _until_terminal(incoming, {None: 1})
    assert events[-1].response.output_text == replies.expected_text(upstream_body(replies))


async def test_the_key_rate_limit_applies_as_for_post(keyed: ServerProcess, replies: Emulator) -> None:
    base = f"{keyed.url}/v1"
    async with (
        openai.AsyncOpenAI(base_url=base, api_key=LIMITED_KEY, max_retries=0) as sdk,
        sdk.responses.connect() as connection,
    ):
        incoming = _events(connection)
        for turn in range(REQUESTS_PER_MINUTE + 1):
            await connection.response.create(model=MODEL, input=f"Turn {turn}", stream_id="q")
        events = await _until_terminal(incoming, {"q": REQUESTS_PER_MINUTE + 1})
        ends = [event for event in events if event.type in TERMINAL or event.type == "error"]
        assert [event.type for event in ends] == [*["response.completed"] * REQUESTS_PER_MINUTE, "error"]
        refused = ends[-1]
        assert refused.status == 429 and refused.stream_id == "q"
        assert refused.error.type == "rate_limit_error" and refused.error.code == "rate_limited"
        with pytest.raises(openai.RateLimitError):  # one budget for the socket and POST
            await sdk.responses.create(model=MODEL, input="Over HTTP")
    assert len(replies.generations()) == REQUESTS_PER_MINUTE


async def test_lanes_and_running_responses_are_bounded(
    client: openai.AsyncOpenAI, replies: Emulator, paced: Callable[..., None]
) -> None:
    paced(token_rate=20.0, tokens=400)  # twenty seconds each: nothing ends during the test
    # The test reads only the errors: unbounded client buffering lets its close get through at once.
    async with client.responses.connect(websocket_connection_options={"max_queue": None}) as connection:
        incoming = _events(connection)
        for lane in range(MAX_LANES + 1):
            await connection.response.create(model=MODEL, input=f"Lane {lane}", stream_id=f"l{lane}")
        for _ in range(MAX_QUEUED + 1):
            await connection.response.create(model=MODEL, input="Waiting", stream_id="l0")
        errors: list[Any] = []
        async with asyncio.timeout(30):
            while len(errors) < 2:
                event = await anext(incoming)
                if event.type == "error":
                    errors.append(event)
        assert sorted(error.stream_id for error in errors) == ["l0", f"l{MAX_LANES}"]
        assert {(error.status, error.error.code) for error in errors} == {(429, "too_many_inflight")}
        for _ in range(200):  # the first MAX_ACTIVE start...
            if len(replies.generations()) >= MAX_ACTIVE:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # ...and the waiting lanes stay waiting
        assert len(replies.generations()) == MAX_ACTIVE
    for _ in range(100):  # closing the socket closed every upstream
        if all(record.finished is not None for record in replies.generations()):
            break
        await asyncio.sleep(0.05)
    records = replies.generations()
    assert len(records) == MAX_ACTIVE and all(record.client_closed_early for record in records)


async def test_function_tool_round_trip(client: openai.AsyncOpenAI, replies: Emulator) -> None:
    async with client.responses.connect() as connection:
        incoming = _events(connection)
        await connection.response.create(
            model=MODEL, input="Weather in Lima?", tools=[WEATHER], stream_id="t"
        )
        first = (await _until_terminal(incoming, {"t": 1}))[-1].response
        (call,) = [item for item in first.output if item.type == "function_call"]
        jsonschema.validate(json.loads(call.arguments), PARAMETERS)
        result: Any = [{"type": "function_call_output", "call_id": call.call_id, "output": '{"temp_c": 19}'}]
        await connection.response.create(
            model=MODEL, input=result, previous_response_id=first.id, tools=[WEATHER], stream_id="t"
        )
        second = (await _until_terminal(incoming, {"t": 1}))[-1].response
    sent = upstream_body(replies)
    assert [message["role"] for message in sent["messages"]] == ["user", "assistant", "tool"]
    assert sent["messages"][2]["content"] == '{"temp_c": 19}'
    assert second.status == "completed" and second.output_text == replies.expected_text(sent)


async def test_an_unstored_response_continues_on_its_own_socket_only(
    client: openai.AsyncOpenAI, replies: Emulator
) -> None:
    async with client.responses.connect() as connection:
        incoming = _events(connection)
        await connection.response.create(model=MODEL, input="Unstored", store=False, stream_id="m")
        first = (await _until_terminal(incoming, {"m": 1}))[-1].response
        with pytest.raises(openai.NotFoundError):
            await client.responses.retrieve(first.id)
        await connection.response.create(  # another lane of the same socket
            model=MODEL, input="And then?", previous_response_id=first.id, store=False, stream_id="n"
        )
        second = (await _until_terminal(incoming, {"n": 1}))[-1].response
    sent = upstream_body(replies)
    assert [(message["role"], message["content"]) for message in sent["messages"]] == [
        ("user", "Unstored"),
        ("assistant", first.output_text),
        ("user", "And then?"),
    ]
    assert second.status == "completed" and second.output_text == replies.expected_text(sent)
    async with client.responses.connect() as other:
        await other.response.create(model=MODEL, input="Again", previous_response_id=first.id)
        (refused,) = await _until_terminal(_events(other), {None: 1})
    assert refused.type == "error" and refused.error.param == "previous_response_id"


async def _status_after(client: openai.AsyncOpenAI, response_id: str) -> Any:
    for _ in range(100):  # the server sees the close within a moment
        response = await client.responses.retrieve(response_id)
        if response.status != "in_progress":
            return response
        await asyncio.sleep(0.05)
    return response


async def test_a_closed_socket_cancels_its_response(
    client: openai.AsyncOpenAI, replies: Emulator, paced: Callable[..., None]
) -> None:
    paced(token_rate=50.0, tokens=400)  # eight seconds of text: the socket closes long before
    async with client.responses.connect() as connection:
        incoming = _events(connection)
        await connection.response.create(model=MODEL, input="A long story", stream_id="s")
        deltas = 0
        while deltas < 3:
            event = await anext(incoming)
            deltas += event.type == "response.output_text.delta"
            if event.type == "response.created":
                response_id = event.response.id
    after = await _status_after(client, response_id)
    assert after.status == "cancelled" and after.output_text
    (record,) = replies.generations()
    assert record.client_closed_early  # the upstream was closed


async def test_the_sdk_reconnects_and_the_completed_response_is_kept(
    client: openai.AsyncOpenAI, replies: Emulator
) -> None:
    state: dict[str, Any] = {"codes": [], "sent": []}

    def reconnecting(event: Any) -> None:
        state["codes"].append(event.close_code)
        # Sent while the SDK reconnects: it queues the event and sends it on the new socket.
        create = state["connection"].response.create(
            model=MODEL, input="After the cut", previous_response_id=state["first"].id, stream_id="r"
        )
        state["sent"].append(asyncio.ensure_future(create))

    async with client.responses.connect(on_reconnecting=reconnecting, initial_delay=0.05) as connection:
        incoming = _events(connection)
        state["connection"] = connection
        await connection.response.create(model=MODEL, input="Before the cut", stream_id="r")
        first = state["first"] = (await _until_terminal(incoming, {"r": 1}))[-1].response
        # The network goes away (a reset, no close frame) under the SDK's current socket.
        reset(connection._connection.transport)
        events = await _until_terminal(incoming, {"r": 1})
    assert state["codes"] == [1006] and len(state["sent"]) == 1
    final = events[-1].response
    assert events[0].type == "response.created" and final.previous_response_id == first.id
    sent = upstream_body(replies)
    assert [(message["role"], message["content"]) for message in sent["messages"]] == [
        ("user", "Before the cut"),
        ("assistant", first.output_text),
        ("user", "After the cut"),
    ]
    assert final.status == "completed" and final.output_text == replies.expected_text(sent)
    kept = await client.responses.retrieve(first.id)  # the completed response outlived its socket
    assert kept.status == "completed" and kept.output_text == first.output_text


async def test_a_write_stuck_past_the_stall_limit_closes_4008() -> None:
    """From the inside: a peer that stops reading holds a write; past ``outbound_stall_s`` the
    watchdog gives the socket up (close 4008, reading stopped, the stuck write cancelled as the
    socket ends) and later writes fail at once."""
    sent: list[Any] = []

    async def stuck_send(message: Any) -> None:
        sent.append(message)
        await asyncio.Event().wait()  # the peer's window never opens again

    services: Any = SimpleNamespace(settings=SimpleNamespace(outbound_stall_s=0.05), metrics=Metrics())
    connection = _Connection(cast(Any, None), services, stuck_send)
    reader = asyncio.ensure_future(asyncio.sleep(30))
    connection._reader = reader
    started = time.monotonic()
    writing = asyncio.ensure_future(connection._write(b'{"type":"response.output_text.delta"}'))
    async with asyncio.timeout(5):
        with pytest.raises(asyncio.CancelledError):
            await reader
    assert time.monotonic() - started >= 0.05
    assert connection._close_code is CloseCode.SLOW_CONSUMER and not writing.done()
    await connection._end()  # what serve does once reading stopped
    writing.cancel()
    await asyncio.gather(writing, return_exceptions=True)
    with pytest.raises(_Gone):
        await connection._write(b'{"type":"response.output_text.delta"}')
    assert len(sent) == 1  # nothing more was handed to the socket
