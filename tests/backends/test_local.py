"""The embedded SmolLM2-135M-Instruct through `LocalGenerator`: the real shipped model, real decoding.

Uses the configured cache folder (``SLUICE_CACHE_DIR``, default ``~/.cache/sluice``): on a fresh
machine the module fixture converts the GGUF (~30 s) and every later run reuses the copy.
Texts are short (max_tokens <= 32) because this CPU makes ~5-20 tokens/s under load.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from protocol.errors import ErrorCode, SluiceError
from server.backends.base import GenerationRequest, GenerationResult, SamplingOptions, Turn
from server.backends.local import LocalGenerator
from server.backends.local_model import VocabProjection
from server.backends.local_text import TextStream
from server.settings import Settings

pytestmark = [pytest.mark.models, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def local() -> Iterator[LocalGenerator]:
    threads = torch.get_num_threads()  # load() sets it process-wide; other test modules keep theirs
    generator = LocalGenerator.load(Settings(ollama_urls=[]))
    print(f"first load: {generator.model.load_seconds:.2f} s (converted: {generator.model.converted})")
    yield generator
    generator.close()
    torch.set_num_threads(threads)


def ask(
    prompt: str | None = None, *, messages: tuple[Turn, ...] | None = None, **options: Any
) -> GenerationRequest:
    system = options.pop("system", None)
    return GenerationRequest(
        model="smollm2:135m",
        prompt=prompt,
        messages=messages,
        system=system,
        options=SamplingOptions(**options),
    )


async def collect(gen: LocalGenerator, request: GenerationRequest) -> tuple[list[str], GenerationResult]:
    pieces: list[str] = []
    async for item in gen.generate(request):
        if isinstance(item, str):
            pieces.append(item)
        else:
            return pieces, item
    raise AssertionError("the stream ended without a result")


async def text_of(gen: LocalGenerator, request: GenerationRequest) -> str:
    return "".join((await collect(gen, request))[0])


async def eventually(condition: Callable[[], bool], timeout_s: float = 120.0) -> None:
    """Poll (bounded) until the condition holds; the decode loop runs on another thread."""
    for _ in range(int(timeout_s / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached in time")


async def wait_idle(gen: LocalGenerator) -> None:
    await eventually(lambda: gen.active == 0)


def test_the_output_projection_is_swapped_but_still_tied(local: LocalGenerator) -> None:
    model = local.model.model
    assert isinstance(model.lm_head, VocabProjection)
    assert model.lm_head.weight is model.model.embed_tokens.weight


async def test_streams_a_coherent_answer(local: LocalGenerator) -> None:
    pieces, result = await collect(
        local, ask("What is the capital of France?", temperature=0.0, max_tokens=32)
    )
    text = "".join(pieces)
    print(repr(text), result)
    assert "Paris" in text
    assert len(pieces) > 3 and all(pieces)
    assert result.finish_reason == "stop"
    assert result.prompt_tokens > 10 and 0 < result.completion_tokens <= 32
    assert result.prompt_eval_ms and result.eval_ms and result.total_ms


async def test_chat_messages_and_system(local: LocalGenerator) -> None:
    messages = (Turn("user", "What is the capital of France?"),)
    text = await text_of(
        local, ask(messages=messages, system="You answer geography questions.", temperature=0.0)
    )
    assert "Paris" in text


async def test_a_seed_reproduces_the_text_alone_and_inside_a_batch(local: LocalGenerator) -> None:
    seeded = ask("Tell me a fun fact about cats.", temperature=0.9, seed=1234, max_tokens=24)
    first = await text_of(local, seeded)
    assert await text_of(local, seeded) == first
    others = [
        ask("Tell me a fun fact about cats.", temperature=0.9, seed=s, max_tokens=24) for s in (1, 2, 3)
    ]
    together = await asyncio.gather(*(text_of(local, r) for r in [*others, seeded]))
    assert together[-1] == first
    assert len(set(together)) > 1, "different seeds should not all give the same text"


async def test_max_tokens_ends_with_length(local: LocalGenerator) -> None:
    pieces, result = await collect(
        local, ask("Write a long story about a dragon.", temperature=0.0, max_tokens=5)
    )
    assert (result.finish_reason, result.completion_tokens) == ("length", 5)
    assert "".join(pieces)


async def test_a_stop_string_ends_the_text_before_it(local: LocalGenerator) -> None:
    request = ask("Write a haiku about the sea.", temperature=0.0, max_tokens=24)
    full = await text_of(local, request)
    stop = full.split()[len(full.split()) // 2]
    pieces, result = await collect(
        local, ask("Write a haiku about the sea.", temperature=0.0, max_tokens=24, stop=[stop])
    )
    assert "".join(pieces) == full[: full.index(stop)]
    assert result.finish_reason == "stop"


async def test_cancel_stops_within_one_token(local: LocalGenerator) -> None:
    stream = local.generate(ask("Write a long story about a dragon.", temperature=0.0, max_tokens=200))
    for _ in range(3):
        assert isinstance(await anext(stream), str)
    await stream.aclose()
    after_cancel = local.decoded_tokens
    await wait_idle(local)
    print("tokens after cancel:", local.decoded_tokens - after_cancel)
    assert local.decoded_tokens - after_cancel <= 1


async def test_cancelling_the_consuming_task_stops_within_one_token(local: LocalGenerator) -> None:
    got_one = asyncio.Event()

    async def consume() -> None:
        async for _ in local.generate(ask("Write a long story about a dragon.", max_tokens=200)):
            got_one.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(got_one.wait(), 120)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    after_cancel = local.decoded_tokens
    await wait_idle(local)
    assert local.decoded_tokens - after_cancel <= 1


PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three colors.",
    "Explain gravity in one sentence to a child.",
]


async def test_four_concurrent_requests_each_get_their_solo_text(local: LocalGenerator) -> None:
    solo = [await text_of(local, ask(p, temperature=0.0, max_tokens=24)) for p in PROMPTS]
    together = await asyncio.gather(
        *(text_of(local, ask(p, temperature=0.0, max_tokens=24)) for p in PROMPTS)
    )
    assert together == solo
    assert "Paris" in together[0]

    # Joining a batch that is already running (different lengths, padding, merge) changes nothing.
    first = asyncio.create_task(text_of(local, ask(PROMPTS[1], temperature=0.0, max_tokens=24)))
    start = local.decoded_tokens
    await eventually(lambda: local.decoded_tokens >= start + 4)
    late = [
        text_of(local, ask(p, temperature=0.0, max_tokens=24)) for p in (PROMPTS[0], PROMPTS[2], PROMPTS[3])
    ]
    assert await asyncio.gather(first, *late) == [solo[1], solo[0], solo[2], solo[3]]


async def test_utf8_is_never_split_with_the_real_tokenizer(local: LocalGenerator) -> None:
    text = "Crème brûlée, naïve café: 東京 🎉🍰 ok"
    ids: list[int] = local.model.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert any(local.model.decode(ids[:i]).endswith("\ufffd") for i in range(1, len(ids))), "no split char"
    stream = TextStream(local.model.decode)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


async def test_bad_options_are_invalid_request(local: LocalGenerator) -> None:
    with pytest.raises(SluiceError) as caught:
        await text_of(local, ask("hi", temperature=-1.0))
    assert caught.value.code is ErrorCode.INVALID_REQUEST


def test_a_second_load_reads_the_safetensors_copy_quickly(local: LocalGenerator) -> None:
    started = time.perf_counter()
    again = LocalGenerator.load(Settings(ollama_urls=[]))
    elapsed = time.perf_counter() - started
    try:
        print(f"second load: {again.model.load_seconds:.2f} s ({elapsed:.2f} s with the decode thread)")
        assert not again.model.converted
        assert again.model.load_seconds < 5.0  # ~0.3-1 s when the machine is quiet
    finally:
        again.close()
