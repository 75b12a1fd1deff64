"""sluice's Python client, for notebooks and scripts: streaming sessions that survive reconnects.

Async (on your event loop)::

    s = await sluice_client.connect("http://127.0.0.1:8000")
    async for piece in s.generate(prompt="Hello"):
        print(piece, end="")

Sync (a background loop thread; works inside Jupyter's running loop)::

    s = sluice_client.Client("http://127.0.0.1:8000").session()
    for piece in s.chat("Hello"):
        print(piece, end="")
    vectors = s.embed(texts)            # float32 (len(texts), d), batched with a progress bar

Tools and structured output (``format="json"`` or a JSON Schema dict)::

    result = s.generate(messages=turns, tools=[weather_tool]).collect()   # finish_reason "tool_calls"
    turns.append(result.message)        # the assistant turn, its calls included
    turns += [call.reply(json.dumps(get_weather(**call.parsed))) for call in result.tool_calls]

Every failure is a `SluiceError` (``code``, ``message``, ``retryable``, ``retry_after_ms``).
The message models are the ``protocol`` package's own; this package never redefines them.
"""

from protocol.errors import ErrorCode, SluiceError
from sluice_client.connection import Backoff
from sluice_client.notebook import stream_to_display
from sluice_client.session import AsyncClient, AsyncSession, Scores, connect
from sluice_client.streams import AsyncGenerateStream, GenerationResult, ToolCall
from sluice_client.sync import Client, GenerateStream, Session

__all__ = [
    "AsyncClient",
    "AsyncGenerateStream",
    "AsyncSession",
    "Backoff",
    "Client",
    "ErrorCode",
    "GenerateStream",
    "GenerationResult",
    "Scores",
    "Session",
    "SluiceError",
    "ToolCall",
    "__version__",
    "connect",
    "stream_to_display",
]

__version__ = "0.1.0"
