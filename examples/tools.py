"""Tools and structured output with the Python client, against a running sluice server.

The model is made to call ``get_weather``; the call is answered with a ``tool`` message and the
model replies in text. Then a reply shaped by a JSON Schema. Run a server (``make run``), then::

    python examples/tools.py [http://127.0.0.1:8000]
"""

from __future__ import annotations

import json
import sys
from typing import Any

import sluice_client

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 40},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
RIVER = {
    "type": "object",
    "properties": {
        "river": {"type": "string", "maxLength": 30},
        "length_km": {"type": "integer", "minimum": 0},
    },
    "required": ["river", "length_km"],
    "additionalProperties": False,
}


def get_weather(city: str, unit: str) -> dict[str, Any]:
    """A stand-in for a real weather service."""
    return {"city": city, "sky": "sunny", "temperature": 21 if unit == "celsius" else 70, "unit": unit}


def main(url: str) -> None:
    with sluice_client.Client(url) as client, client.session() as s:
        turns: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
        first = s.generate(
            messages=turns, tools=[WEATHER_TOOL], tool_choice="required", max_tokens=64
        ).collect()
        turns.append(first.message)  # the assistant turn, its calls included
        for call in first.tool_calls:
            print(f"-> {call.name}({call.arguments})")
            turns.append(call.reply(json.dumps(get_weather(**call.parsed))))
        reply = s.generate(messages=turns, tools=[WEATHER_TOOL], tool_choice="none", max_tokens=48)
        for piece in reply:
            print(piece, end="", flush=True)
        print()
        river = s.generate("Name a long river and its length in km.", format=RIVER, max_tokens=48).collect()
        print(json.loads(river.text))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8000")
