"""One token stream, read three ways: from a sluice session, from the seed relay, from Ollama directly.

Each reader returns a `StreamRecord`: when the request was sent and when each piece arrived with
how many tokens it carried. Tokens are counted from the text, not from the server's own report:
the emulator's pieces are single words (the first bare, the rest with one leading space), so a
piece — or a delta that merges several — carries as many tokens as it has word starts. That is what
makes "tokens lost" a client-side fact. Only the emulator's output obeys this rule.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from bench.rawhttp import HttpConnection, iter_lines, iter_sse
from bench.session_clients import EventHandler, new_id

__all__ = ["StreamRecord", "direct_stream", "seed_stream", "session_stream", "word_tokens"]


class _Session(Protocol):
    async def submit(self, request: dict[str, Any], on_event: EventHandler | None = None) -> Any: ...


def word_tokens(text: str, first: bool) -> int:
    """Tokens in a piece of emulator text (`first`: nothing of this stream arrived before it)."""
    return text.count(" ") + (1 if first and text and not text.startswith(" ") else 0)


@dataclass
class StreamRecord:
    sent_at: float = 0.0
    arrivals: list[tuple[float, int]] = field(default_factory=list)  # (perf_counter, tokens)
    finish: str | None = None
    error: str | None = None
    usage_tokens: int | None = None  # what the server itself reported, for comparison only

    @property
    def tokens(self) -> int:
        return sum(count for _, count in self.arrivals)

    @property
    def ttft_s(self) -> float | None:
        return self.arrivals[0][0] - self.sent_at if self.arrivals else None

    def add(self, at: float, text: str) -> None:
        count = word_tokens(text, first=not self.arrivals)
        if count:
            self.arrivals.append((at, count))

    def token_times(self) -> list[float]:
        """Arrival time of every token (tokens merged into one piece share its time)."""
        return [at for at, count in self.arrivals for _ in range(count)]


async def session_stream(session: _Session, model: str, prompt: str, max_tokens: int) -> StreamRecord:
    """A `generate` on a sluice session (WebSocket or SSE): deltas until its terminal message."""
    record = StreamRecord()

    def on_event(at: float, message: dict[str, Any]) -> None:
        if message.get("type") == "delta":
            record.add(at, message.get("text", ""))

    request = {
        "type": "generate",
        "id": new_id("g"),
        "model": model,
        "prompt": prompt,
        "options": {"max_tokens": max_tokens},
    }
    record.sent_at = time.perf_counter()
    terminal = await (await session.submit(request, on_event))
    if terminal.get("type") == "done":
        record.finish = terminal.get("finish_reason")
        record.usage_tokens = (terminal.get("usage") or {}).get("completion_tokens")
    else:
        record.error = str(terminal.get("code", terminal.get("type")))
    return record


async def seed_stream(conn: HttpConnection, model: str, prompt: str, max_tokens: int) -> StreamRecord:
    """`POST /api/v1/generate/stream` (seed or sluice): `data:` chunks until `data: [DONE]`."""
    record = StreamRecord()
    body = {"prompt": prompt, "model": model, "max_tokens": max_tokens}
    record.sent_at = time.perf_counter()
    async for at, event in iter_sse(conn.stream("POST", "/api/v1/generate/stream", body)):
        data = event["data"]
        if data == "[DONE]":
            record.finish = record.finish or "stop"
            break
        chunk = orjson.loads(data)
        if isinstance(chunk, dict) and "error" in chunk:
            record.error = str(chunk["error"])
            break
        text = chunk.get("text") or chunk.get("token") or chunk.get("response") or ""
        record.add(at, text)
    return record


async def direct_stream(conn: HttpConnection, model: str, prompt: str, max_tokens: int) -> StreamRecord:
    """Ollama's own `POST /api/generate` NDJSON, read with no server in between."""
    record = StreamRecord()
    body = {"model": model, "prompt": prompt, "stream": True, "options": {"num_predict": max_tokens}}
    record.sent_at = time.perf_counter()
    async for at, line in iter_lines(conn.stream("POST", "/api/generate", body)):
        chunk = orjson.loads(line)
        if "error" in chunk:
            record.error = str(chunk["error"])
            break
        record.add(at, chunk.get("response", ""))
        if chunk.get("done"):
            record.finish = chunk.get("done_reason")
            record.usage_tokens = chunk.get("eval_count")
    return record
