"""Background OpenAI responses, driven by the real ``openai`` SDK against a real server whose Ollama
is the emulator (exact text): running with no client, resumed by ``starting_after`` after the
client dropped its stream, read by two clients at once, cancelled (the upstream closed), chained
``input_items``, and, on a server with keys and a short TTL, ownership and expiry."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import openai
import pytest

from server.api.compat.responses_run import TERMINAL
from tests.api.compat.conftest import upstream_body
from tests.api.conftest import MODEL, sluice
from tests.support.ollama_emulator import Emulator
from tests.support.server import ServerProcess

pytestmark = pytest.mark.timeout(120)

KEY_A, KEY_B = "run-key-a", "run-key-b"
TTL_S = 3


@pytest.fixture
async def client(base_url: str) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0) as sdk:
        yield sdk


def _deltas(events: list[Any]) -> str:
    return "".join(event.delta for event in events if event.type == "response.output_text.delta")


async def _settled(client: openai.AsyncOpenAI, response_id: str) -> Any:
    for _ in range(400):
        response = await client.responses.retrieve(response_id)
        if response.status not in ("queued", "in_progress"):
            return response
        await asyncio.sleep(0.025)
    raise AssertionError(f"{response_id} still {response.status}")


async def test_background_runs_with_no_client(
    client: openai.AsyncOpenAI, replies: Emulator, paced: Callable[..., None]
) -> None:
    paced(token_rate=100.0, tokens=40)
    created = await client.responses.create(model=MODEL, input="A story", background=True)
    assert created.status in ("queued", "in_progress") and created.background
    for _ in range(200):  # progress shows while it runs
        during = await client.responses.retrieve(created.id)
        if during.output_text:
            break
        await asyncio.sleep(0.02)
    assert during.status == "in_progress" and during.output_text
    done = await _settled(client, created.id)
    expected = replies.expected_text(upstream_body(replies))
    assert done.status == "completed" and done.output_text == expected
    assert expected.startswith(during.output_text) and done.usage is not None


async def test_resume_after_the_client_dropped_its_stream(
    client: openai.AsyncOpenAI, replies: Emulator, paced: Callable[..., None]
) -> None:
    paced(token_rate=100.0, tokens=60)
    stream = await client.responses.create(model=MODEL, input="A story", background=True, stream=True)
    first: list[Any] = []
    async for event in stream:
        first.append(event)
        if sum(e.type == "response.output_text.delta" for e in first) == 5:
            break
    await stream.close()  # the client drops the stream; the response goes on
    response_id = first[0].response.id
    last = first[-1].sequence_number
    assert [event.sequence_number for event in first] == list(range(last + 1))
    resumed = await client.responses.retrieve(response_id, stream=True, starting_after=last)
    rest = [event async for event in resumed]
    assert [event.sequence_number for event in rest] == list(range(last + 1, last + 1 + len(rest)))
    assert rest[-1].type == "response.completed"
    expected = replies.expected_text(upstream_body(replies))
    assert _deltas(first) + _deltas(rest) == expected
    assert rest[-1].response.output_text == expected
    again = await client.responses.retrieve(response_id, stream=True, starting_after=-1)  # the whole log
    whole = [event async for event in again]
    assert [event.model_dump() for event in whole] == [event.model_dump() for event in first + rest]
    assert not replies.generations()[-1].client_closed_early


async def test_two_concurrent_readers_of_one_run(
    client: openai.AsyncOpenAI, replies: Emulator, paced: Callable[..., None]
) -> None:
    paced(token_rate=150.0, tokens=45)
    created = await client.responses.create(model=MODEL, input="Tell it twice", background=True)

    async def read(after: int) -> list[dict[str, Any]]:
        stream = await client.responses.retrieve(created.id, stream=True, starting_after=after)
        return [event.model_dump() async for event in stream]

    one, two = await asyncio.gather(read(-1), read(1))
    assert [event["sequence_number"] for event in one] == list(range(len(one)))
    assert two == one[2:]
    expected = replies.expected_text(upstream_body(replies))
    assert "".join(e["delta"] for e in one if e["type"] == "response.output_text.delta") == expected


async def test_cancel_closes_the_upstream(
    client: openai.AsyncOpenAI, replies: Emulator, paced: Callable[..., None]
) -> None:
    paced(token_rate=40.0, tokens=400)  # ten seconds of text
    created = await client.responses.create(model=MODEL, input="A long story", background=True)
    assert await replies.until(
        lambda: bool(replies.generations()) and replies.generations()[-1].pieces_sent > 2
    )
    cancelled = await client.responses.cancel(created.id)
    assert cancelled.status == "cancelled" and cancelled.output_text
    record = replies.generations()[-1]
    assert await replies.until(lambda: record.client_closed_early), "upstream still open"
    assert record.text_sent.startswith(cancelled.output_text)
    assert (await client.responses.retrieve(created.id)).status == "cancelled"
    again = await client.responses.cancel(created.id)  # idempotent, as OpenAI's
    assert again.status == "cancelled" and again.output_text == cancelled.output_text
    stream = await client.responses.retrieve(created.id, stream=True, starting_after=1)
    assert [event.type async for event in stream if event.type in TERMINAL] == []


async def test_cancel_a_finished_or_foreground_response(client: openai.AsyncOpenAI) -> None:
    finished = await client.responses.create(model=MODEL, input="Quick", background=True)
    done = await _settled(client, finished.id)
    assert (await client.responses.cancel(finished.id)).model_dump() == done.model_dump()
    foreground = await client.responses.create(model=MODEL, input="Quick")
    with pytest.raises(openai.BadRequestError) as refused:
        await client.responses.cancel(foreground.id)
    assert "background" in refused.value.message
    with pytest.raises(openai.NotFoundError):
        await client.responses.cancel("resp_unknown")


async def test_chained_input_items_list_the_earlier_responses(client: openai.AsyncOpenAI) -> None:
    first = await client.responses.create(model=MODEL, input="One")
    second = await client.responses.create(model=MODEL, input="Two", previous_response_id=first.id)
    listed = await client.responses.input_items.list(second.id)
    texts = [item.content[0].text for item in listed.data]
    assert texts == ["Two", first.output_text, "One"]  # newest first
    assert listed.data[1].id == first.output[0].id
    oldest = await client.responses.input_items.list(second.id, order="asc", limit=2)
    assert [item.content[0].text for item in oldest.data] == ["One", first.output_text] and oldest.has_more


async def test_a_streamed_response_whose_client_leaves_closes_the_upstream(
    client: openai.AsyncOpenAI, replies: Emulator, paced: Callable[..., None]
) -> None:
    paced(token_rate=50.0, tokens=400)
    stream = await client.responses.create(model=MODEL, input="A long story", stream=True)
    seen: list[Any] = []
    async for event in stream:
        seen.append(event)
        if event.type == "response.output_text.delta":
            break
    await stream.close()
    record = replies.generations()[-1]
    assert await replies.until(lambda: record.client_closed_early), "upstream still open"
    after = await _settled(client, seen[0].response.id)
    assert after.status == "cancelled" and after.output[0].status == "incomplete"
    with pytest.raises(openai.BadRequestError) as refused:
        await client.responses.cancel(after.id)  # only background responses can be cancelled
    assert refused.value.status_code == 400


@pytest.fixture(scope="module")
def keyed(emulator: Emulator) -> Iterator[ServerProcess]:
    env = {"SLUICE_OLLAMA_URLS": emulator.url, "SLUICE_API_KEYS": f"{KEY_A},{KEY_B}"}
    with sluice({**env, "SLUICE_RESPONSES_TTL_S": str(TTL_S)}) as process:
        yield process


async def test_another_key_cannot_see_a_run_and_it_expires(
    keyed: ServerProcess, paced: Callable[..., None]
) -> None:
    paced(token_rate=100.0, tokens=30)
    base = f"{keyed.url}/v1"
    async with (
        openai.AsyncOpenAI(base_url=base, api_key=KEY_A, max_retries=0) as owner,
        openai.AsyncOpenAI(base_url=base, api_key=KEY_B, max_retries=0) as other,
    ):
        created = await owner.responses.create(model=MODEL, input="Mine", background=True)
        with pytest.raises(openai.NotFoundError):
            await other.responses.retrieve(created.id)
        with pytest.raises(openai.NotFoundError):
            await other.responses.retrieve(created.id, stream=True, starting_after=0)
        with pytest.raises(openai.NotFoundError):
            await other.responses.cancel(created.id)
        with pytest.raises(openai.NotFoundError):
            await other.responses.delete(created.id)
        done = await _settled(owner, created.id)
        assert done.status == "completed" and done.output_text
        await asyncio.sleep(TTL_S + 0.5)
        with pytest.raises(openai.NotFoundError):
            await owner.responses.retrieve(created.id)
        with pytest.raises(openai.NotFoundError):
            await owner.responses.retrieve(created.id, stream=True, starting_after=0)
