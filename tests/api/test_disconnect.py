"""A client that leaves an HTTP request mid-generation cancels the work upstream.

Proven with the Ollama emulator's record of each generation: the server must close its upstream
response (``client_closed_early``) soon after the client closed its own connection, long before
the emulated generation would have finished.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.api.conftest import MODEL, TOKENS
from tests.support.ollama_emulator import Emulator, RequestRecord

pytestmark = pytest.mark.timeout(120)

# At this pace a full generation takes 5 s; each case leaves after a fraction of a second.
PACE = 40.0
# (path, body builder, lines of output to read before leaving; 0 = a whole-answer request)
CASES: dict[str, tuple[str, Callable[[str], dict[str, Any]], int]] = {
    "seed-sse": ("/api/v1/generate/stream", lambda p: {"model": MODEL, "prompt": p}, 3),
    "openai-sse": (
        "/v1/chat/completions",
        lambda p: {"model": MODEL, "messages": [{"role": "user", "content": p}], "stream": True},
        3,
    ),
    "ollama-ndjson": ("/api/generate", lambda p: {"model": MODEL, "prompt": p}, 3),
    "ollama-chat-ndjson": (
        "/api/chat",
        lambda p: {"model": MODEL, "messages": [{"role": "user", "content": p}]},
        3,
    ),
    "seed-whole": ("/api/v1/generate", lambda p: {"model": MODEL, "prompt": p}, 0),
    "openai-whole": (
        "/v1/chat/completions",
        lambda p: {"model": MODEL, "messages": [{"role": "user", "content": p}]},
        0,
    ),
    "ollama-whole": ("/api/generate", lambda p: {"model": MODEL, "prompt": p, "stream": False}, 0),
}


def _record_for(emulator: Emulator, prompt: str) -> RequestRecord | None:
    for record in emulator.generations():
        body = record.body if isinstance(record.body, dict) else {}
        messages = body.get("messages") or []
        if body.get("prompt") == prompt or any(m.get("content") == prompt for m in messages):
            return record
    return None


@pytest.mark.parametrize("case", list(CASES))
async def test_client_disconnect_cancels_upstream(
    base_url: str, emulator: Emulator, paced: Callable[..., None], case: str
) -> None:
    paced(token_rate=PACE)
    path, body, lines = CASES[case]
    prompt = f"leave early: {case}"
    async with httpx.AsyncClient(base_url=base_url, timeout=30.0) as client:
        if lines:
            async with client.stream("POST", path, json=body(prompt)) as response:
                assert response.status_code == 200
                read = 0
                async for line in response.aiter_lines():
                    read += bool(line.strip())
                    if read >= lines:
                        break
                left_at = time.monotonic()  # leaving the block closes the connection
        else:
            with pytest.raises(httpx.ReadTimeout):
                await client.post(path, json=body(prompt), timeout=httpx.Timeout(30.0, read=0.5))
            left_at = time.monotonic()
    assert await emulator.until(
        lambda: (r := _record_for(emulator, prompt)) is not None and r.client_closed_early, 5.0
    )
    record = _record_for(emulator, prompt)
    assert record is not None and record.closed_at is not None
    assert record.outcome == "client_closed" and record.pieces_sent < TOKENS
    assert record.closed_at - left_at < 1.5, "the upstream stream was not closed promptly"
