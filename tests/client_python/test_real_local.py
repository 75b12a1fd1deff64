"""The client against a real server generating with the embedded SmolLM2 (constrained decoding):
a JSON Schema reply, and a forced tool call whose arguments are valid against its parameters,
answered with a tool result in a second request; and examples/tools.py. Every structured reply
is checked with `jsonschema`. Replies are short: this CPU decodes few tokens per second under load."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest
from sluice_client import AsyncClient, Client

from protocol.messages import ChatMessage
from tests.client_python.knobs import FAST
from tests.support.server import run_server

pytestmark = [pytest.mark.models, pytest.mark.timeout(600)]

LOCAL_MODEL = "smollm2:135m"
WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": WEATHER_PARAMETERS,
    },
}


@pytest.fixture(scope="module")
def local_server() -> Iterator[str]:
    env = {"SLUICE_LOAD_LOCAL_GENERATION": "1", "SLUICE_DEFAULT_MODEL": LOCAL_MODEL}
    with run_server(env) as url:
        yield url


async def test_schema_reply_is_an_instance_of_the_schema(local_server: str) -> None:
    schema = {
        "type": "object",
        "properties": {
            "river": {"type": "string", "maxLength": 24},
            "long": {"type": "boolean"},
            "countries": {
                "type": "array",
                "items": {"type": "string", "maxLength": 16},
                "minItems": 1,
                "maxItems": 2,
            },
        },
        "required": ["river", "long", "countries"],
        "additionalProperties": False,
    }
    async with AsyncClient(local_server, backoff=FAST) as client:
        s = await client.session()
        assert LOCAL_MODEL in s.models.generate
        result = await s.generate(
            "Describe the river Danube as JSON.",
            model=LOCAL_MODEL,
            format=schema,
            options={"temperature": 0.0},
            max_tokens=80,
        )
        assert result.finish_reason == "stop", result
        jsonschema.validate(json.loads(result.text), schema)


def test_forced_tool_call_then_tool_result_round_trip(local_server: str) -> None:
    with Client(local_server, backoff=FAST) as client:
        s = client.session()
        turns: list[ChatMessage | dict[str, str]] = [
            {"role": "user", "content": "What is the weather in Paris?"}
        ]
        choice = {"type": "function", "function": {"name": "get_weather"}}
        stream = s.generate(
            messages=turns,
            model=LOCAL_MODEL,
            tools=[WEATHER],
            tool_choice=choice,
            max_tokens=64,
            temperature=0.0,
        )
        items = list(stream.events())
        result = stream.result
        assert result is not None and result.finish_reason == "tool_calls", result
        assert result.tool_calls and [item for item in items if not isinstance(item, str)] == list(
            result.tool_calls
        )
        call = result.tool_calls[0]
        assert (call.index, call.name) == (0, "get_weather") and call.call_id
        jsonschema.validate(call.parsed, WEATHER_PARAMETERS)
        turns.append(result.message)
        turns.append(call.reply(json.dumps({"city": call.parsed["city"], "sky": "sunny", "degrees": 21})))
        answer = s.generate(
            messages=turns,
            model=LOCAL_MODEL,
            tools=[WEATHER],
            tool_choice="none",
            max_tokens=24,
            temperature=0.0,
        ).collect()
        assert answer.finish_reason in ("stop", "length") and answer.tool_calls == ()
        assert answer.text.strip()


def test_the_tools_example_runs(local_server: str) -> None:
    script = Path(__file__).resolve().parents[2] / "examples" / "tools.py"
    run = subprocess.run(
        [sys.executable, str(script), local_server], capture_output=True, text=True, timeout=300, check=False
    )
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.strip().splitlines()
    assert lines[0].startswith("-> get_weather({"), run.stdout
    river = ast.literal_eval(lines[-1])
    assert set(river) == {"river", "length_km"} and isinstance(river["length_km"], int)
