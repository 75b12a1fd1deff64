"""An ``openai-agents`` run with a function tool against sluice's Responses API, whose Ollama is
the emulator: the Agents SDK's own Responses model over HTTP, and its WebSocket model over
``GET /v1/responses`` (the tool is called with arguments valid for its schema, its result goes
back, and the final output is the emulator's exact text for that conversation)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema
import pytest

from tests.api.compat.conftest import upstream_body
from tests.api.conftest import MODEL
from tests.support.ollama_emulator import Emulator

agents = pytest.importorskip("agents")

pytestmark = pytest.mark.timeout(120)


async def _sockets_opened(base_url: str) -> float:
    """How many Responses WebSockets the server has accepted (its metrics)."""
    async with httpx.AsyncClient(base_url=base_url, timeout=10.0) as http:
        text = (await http.get("/metrics")).text
    prefix = 'sluice_connections_total{transport="responses_ws"} '
    return sum(float(line.removeprefix(prefix)) for line in text.splitlines() if line.startswith(prefix))


@pytest.mark.parametrize("transport", ["http", "websocket"])
async def test_an_agent_calls_a_function_tool(base_url: str, replies: Emulator, transport: str) -> None:
    calls: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        calls.append(city)
        return json.dumps({"city": city, "temp_c": 19})

    provider = agents.OpenAIProvider(
        api_key="unused",
        base_url=f"{base_url}/v1",
        websocket_base_url=f"{base_url.replace('http://', 'ws://', 1)}/v1",
        use_responses=True,
        use_responses_websocket=transport == "websocket",
    )
    agent = agents.Agent(name="weather", instructions="Use the tool.", tools=[get_weather], model=MODEL)
    config = agents.RunConfig(model_provider=provider, tracing_disabled=True)
    sockets = await _sockets_opened(base_url)
    result = await agents.Runner.run(agent, "Weather in Lima?", run_config=config)
    assert await _sockets_opened(base_url) - sockets == (1 if transport == "websocket" else 0)
    first, second = (record.body for record in replies.generations())
    assert isinstance(first, dict) and isinstance(second, dict)
    (offered,) = first["tools"]
    assert offered["function"]["name"] == "get_weather"
    (city,) = calls
    jsonschema.validate({"city": city}, offered["function"]["parameters"])
    sent: Any = upstream_body(replies)
    roles = [message["role"] for message in sent["messages"]]
    assert roles == ["system", "user", "assistant", "tool"]
    assert json.loads(sent["messages"][3]["content"]) == {"city": city, "temp_c": 19}
    assert result.final_output == replies.expected_text(sent)
