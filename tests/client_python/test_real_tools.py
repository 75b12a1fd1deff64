"""Tools and structured output through the client and the real server, generation on the Ollama
emulator (which answers ``tools`` and ``format`` as OLLAMA.md describes Ollama): the calls on the
result, a tool-result round trip as it reaches Ollama, a JSON Schema reply, a resume after the
server's socket is cut between the text and the calls, and the same over SSE."""

from __future__ import annotations

import json

import jsonschema
import orjson
from sluice_client import AsyncClient, Client, ToolCall

from tests.client_python.knobs import FAST
from tests.client_python.tcp_proxy import TcpProxy
from tests.client_python.test_real_server import port_of, require_sse
from tests.support.ollama_emulator import Emulator
from tests.support.ollama_replies import instance_of

WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}, "days": {"type": "integer", "minimum": 1}},
    "required": ["city", "days"],
}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_PARAMETERS}}
CLOCK = {
    "type": "function",
    "function": {"name": "clock", "parameters": {"type": "object", "properties": {}}},
}


def _only(emu: Emulator, marker: str) -> dict[str, object]:
    bodies = [r.body for r in emu.generations() if marker in orjson.dumps(r.body["messages"][0]).decode()]
    assert len(bodies) >= 1, f"no upstream generation holds {marker!r}"
    return bodies[-1]


async def test_tool_calls_then_the_tool_results_round_trip(real_server: str, emu: Emulator) -> None:
    emu.configure(tool_calls=2, text_before_calls=2)
    async with AsyncClient(real_server, backoff=FAST) as client:
        s = await client.session()
        turns: list[object] = [{"role": "user", "content": "weather and time? tools-marker-1"}]
        stream = s.generate(messages=turns, tools=[WEATHER, CLOCK])
        items = [item async for item in stream.events()]
        result = stream.result
        assert result is not None and result.finish_reason == "tool_calls"
        calls = [item for item in items if isinstance(item, ToolCall)]
        assert calls == list(result.tool_calls) and [(c.index, c.name) for c in calls] == [
            (0, "get_weather"),
            (1, "clock"),
        ]
        assert len({c.call_id for c in calls}) == 2
        assert calls[0].parsed == instance_of(WEATHER_PARAMETERS) and calls[1].parsed == {}
        jsonschema.validate(calls[0].parsed, WEATHER_PARAMETERS)
        first_body = _only(emu, "tools-marker-1")
        assert [t["function"]["name"] for t in first_body["tools"]] == ["get_weather", "clock"]  # type: ignore[index]
        assert result.text == emu.expected_text(first_body)

        turns.append(result.message)
        turns += [call.reply(json.dumps({"answer": call.name})) for call in calls]
        answer = await s.generate(messages=turns, tools=[WEATHER, CLOCK])
        assert answer.finish_reason == "stop" and answer.tool_calls == ()
        body = emu.generations()[-1].body
        assert answer.text == emu.expected_text(body)
        sent = body["messages"]
        assert [m["role"] for m in sent] == ["user", "assistant", "tool", "tool"]
        assert [c["function"]["name"] for c in sent[1]["tool_calls"]] == ["get_weather", "clock"]
        assert (
            sent[1]["tool_calls"][0]["function"]["arguments"] == calls[0].parsed
        )  # an object, as Ollama has it
        assert [m["content"] for m in sent[2:]] == ['{"answer": "get_weather"}', '{"answer": "clock"}']


def test_schema_format_reply_is_an_instance(real_server: str, emu: Emulator) -> None:
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 2},
            "ok": {"type": "boolean"},
        },
        "required": ["name", "tags", "ok"],
    }
    with Client(real_server, backoff=FAST) as client:
        s = client.session()
        result = s.generate("shape it, format-marker-1", format=schema).collect()
        assert result.finish_reason == "stop"
        assert json.loads(result.text) == instance_of(schema)
        jsonschema.validate(json.loads(result.text), schema)
        assert emu.generations()[-1].body["format"] == schema


async def test_resume_between_the_text_and_the_calls_replays_exactly(real_server: str, emu: Emulator) -> None:
    emu.configure(token_rate=20, tool_calls=2, text_before_calls=4)
    with TcpProxy(port_of(real_server)) as proxy:
        async with AsyncClient(proxy.url, backoff=FAST) as client:
            s = await client.session()
            stream = s.generate(
                messages=[{"role": "user", "content": "cut-marker-1"}], tools=[WEATHER, CLOCK]
            )
            items = []
            async for item in stream.events():
                items.append(item)
                if len(items) == 1:
                    assert proxy.kill() == 1  # the server's socket dies after the first piece
            result = stream.result
            assert result is not None and result.finish_reason == "tool_calls"
            # Text first (the server may merge pieces into fewer deltas), then the two calls.
            kinds = [type(item) for item in items]
            assert kinds[-2:] == [ToolCall, ToolCall] and set(kinds[:-2]) == {str}
            assert [c.index for c in result.tool_calls] == [0, 1]
            assert result.text == emu.expected_text(_only(emu, "cut-marker-1"))
            assert s.reconnects == 1 and proxy.connections == 2 and len(emu.generations()) == 1


def test_tool_calls_over_sse(real_server: str, emu: Emulator) -> None:
    require_sse(real_server)
    with Client(real_server, transport="sse", backoff=FAST) as client:
        s = client.session()
        assert s.transport == "sse"
        choice = {"type": "function", "function": {"name": "get_weather"}}
        result = s.generate("sse-tools-marker-1", tools=[WEATHER, CLOCK], tool_choice=choice).collect()
        assert result.finish_reason == "tool_calls"
        assert [c.name for c in result.tool_calls] == ["get_weather"]
        jsonschema.validate(result.tool_calls[0].parsed, WEATHER_PARAMETERS)
