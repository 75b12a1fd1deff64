"""`OllamaBackend.relay`: each piece handed on from the connection's read callback, against the emulator.

The same streams as `generate` (text, split lines, tool calls, errors after text), the stall guard
and cancellation with no consumer between reads, and the connection going back to the pool.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from protocol.errors import ErrorCode, SluiceError
from server.backends.base import (
    GenerationItem,
    GenerationRequest,
    GenerationResult,
    SamplingOptions,
    ToolCall,
)
from server.backends.ollama.backend import OllamaBackend
from tests.backends.ollama.test_backend import MODEL, make_settings, only_generation
from tests.backends.ollama.test_tools import WEATHER
from tests.support.ollama_emulator import Emulator

pytestmark = pytest.mark.timeout(60)


async def relayed(
    ollama: OllamaBackend, request: GenerationRequest
) -> tuple[list[GenerationItem], GenerationResult]:
    got: list[GenerationItem] = []
    result = await ollama.relay(request, got.append, got.append)
    return got, result


async def generated(ollama: OllamaBackend, request: GenerationRequest) -> list[GenerationItem]:
    return [item async for item in ollama.generate(request)]


@pytest.mark.parametrize(("lines_per_write", "split"), [(1, False), (1, True), (5, True)])
async def test_relay_hands_on_what_generate_yields(
    emu: Emulator, backend: OllamaBackend, lines_per_write: int, split: bool
) -> None:
    emu.configure(lines_per_write=lines_per_write, split_lines=split, tokens=40, token_rate=1000)
    request = GenerationRequest(MODEL, prompt="split me", options=SamplingOptions(seed=3))
    got, result = await relayed(backend, request)
    # Piece boundaries follow the reads (generate merges what came while its consumer was busy).
    assert "".join(map(str, got)) == "".join(map(str, (await generated(backend, request))[:-1]))
    first, second = emu.generations()
    assert "".join(str(piece) for piece in got) == emu.expected_text(first.body)
    assert result.completion_tokens == 40 and result.finish_reason == "stop"
    assert not first.client_closed_early and not second.client_closed_early


async def test_relay_hands_on_text_then_tool_calls(emu: Emulator, backend: OllamaBackend) -> None:
    emu.configure(tool_calls=1)
    request = GenerationRequest(MODEL, prompt="weather?", tools=(WEATHER,))
    got, result = await relayed(backend, request)
    texts = [item for item in got if isinstance(item, str)]
    assert texts and got[: len(texts)] == texts
    assert [item.name for item in got if isinstance(item, ToolCall)] == ["get_weather"]
    assert result.finish_reason == "tool_calls"


async def test_an_error_line_after_text_raises_after_that_text(emu: Emulator, backend: OllamaBackend) -> None:
    got: list[str] = []
    with pytest.raises(SluiceError) as caught:
        await backend.relay(GenerationRequest("fault-error-midstream", prompt="x"), got.append, got.append)  # type: ignore[arg-type]
    assert caught.value.code is ErrorCode.UPSTREAM_ERROR
    record = only_generation(emu)
    assert "".join(got) == record.text_sent and record.pieces_sent == 3


async def test_a_callback_that_raises_ends_the_stream_and_closes_upstream(
    emu: Emulator, backend: OllamaBackend
) -> None:
    emu.configure(token_rate=20, tokens=200)
    got: list[str] = []

    def take(piece: str) -> None:
        got.append(piece)
        if len(got) == 2:
            raise RuntimeError("consumer broke")

    with pytest.raises(SluiceError) as caught:
        await backend.relay(GenerationRequest(MODEL, prompt="break"), take, lambda call: None)
    assert caught.value.code is ErrorCode.INTERNAL
    assert len(got) == 2  # nothing handed on after the raise
    record = only_generation(emu)
    assert await emu.until(lambda: record.client_closed_early)
    assert backend.status()[emu.url]["inflight"] == 0


async def test_a_hung_relay_times_out_and_closes_upstream(emu: Emulator) -> None:
    ollama = OllamaBackend(make_settings(emu.url, ollama_idle_timeout_s=0.3))
    stamps: list[float] = []
    try:
        with pytest.raises(SluiceError) as caught:
            await ollama.relay(
                GenerationRequest("fault-hang", prompt="x"),
                lambda _: stamps.append(time.monotonic()),
                lambda _: None,
            )
        waited = time.monotonic() - stamps[-1]
    finally:
        await ollama.aclose()
    assert caught.value.code is ErrorCode.TIMEOUT
    assert 0.25 <= waited < 5.0  # the 0.3 s timeout, not one of the 10 s ones (a busy machine is late)
    record = only_generation(emu)
    assert len(stamps) == record.pieces_sent
    assert await emu.until(lambda: record.client_closed_early)


async def test_cancelling_the_task_stops_handing_on_and_closes_upstream(
    emu: Emulator, backend: OllamaBackend
) -> None:
    emu.configure(token_rate=50, tokens=500)
    got: list[str] = []
    after_cancel: list[str] = []
    cancelled = False
    two = asyncio.Event()

    def take(piece: str) -> None:
        (after_cancel if cancelled else got).append(piece)
        if len(got) == 2:
            two.set()

    task = asyncio.create_task(backend.relay(GenerationRequest(MODEL, prompt="cancel"), take, lambda _: None))
    await asyncio.wait_for(two.wait(), 5)
    task.cancel()
    cancelled = True
    closed = time.monotonic()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert after_cancel == []
    record = only_generation(emu)
    assert await emu.until(lambda: record.client_closed_early)
    assert record.closed_at is not None and record.closed_at - closed < 0.5
    assert backend.status()[emu.url]["inflight"] == 0
