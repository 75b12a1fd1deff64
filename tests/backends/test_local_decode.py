"""The batched decode loop (`server.backends.local_decode`) through `LocalGenerator`, with a fake model.

The fake model keeps each token id in its one-layer KV cache and picks the next token from the
real tokens it can see through the attention mask, checking the position ids on the way. Any
mistake in padding, merging, trimming, masks or positions changes a batched sequence, so
"batched output == solo output" here is exact. The real model is in `test_local.py`.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from protocol.errors import ErrorCode, SluiceError
from server.backends.base import GenerationRequest, GenerationResult, SamplingOptions
from server.backends.local import LocalGenerator, map_error
from server.backends.local_model import LocalModel

pytestmark = pytest.mark.timeout(60)

EOS = 1
VOCAB = 128


class FakeTokenizer:
    """Characters are tokens; the chat template just joins the turns."""

    def apply_chat_template(self, turns: list[dict[str, str]], **_: object) -> str:
        return "|".join(turn["content"] for turn in turns) + ">"

    def __call__(self, text: str, **_: object) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) % VOCAB for c in text]}

    def decode(self, ids: Sequence[int], **_: object) -> str:
        return "".join(chr(i) for i in ids if i != EOS)


class FakeModel:
    """A deterministic 'language model' whose output depends on exactly the visible sequence."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.calls = 0
        self.batch_sizes: list[int] = []
        self.prefill_sizes: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.fail_with: BaseException | None = None

    def __call__(
        self,
        input_ids: torch.Tensor,
        past_key_values: Any,
        use_cache: bool,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> SimpleNamespace:
        self.calls += 1
        self.gate.wait(10)
        if self.fail_with is not None:
            raise self.fail_with
        time.sleep(self.delay_s)
        batch, width = input_ids.shape
        self.batch_sizes.append(batch)
        if width > 1:
            self.prefill_sizes.append(batch)
        stored = input_ids.float()[:, None, :, None]
        keys, _ = past_key_values.update(stored, stored, 0)
        length = keys.shape[2]
        mask = torch.ones(batch, length) if attention_mask is None else attention_mask
        assert mask.shape == (batch, length)
        logits = torch.full((batch, 1, VOCAB), -1e9)
        for row in range(batch):
            visible = keys[row, 0, mask[row].bool(), 0].long().tolist()
            assert all(t != 0 for t in visible), "a padding column leaked through the mask"
            if position_ids is not None:
                assert position_ids[row, -1].item() == len(visible) - 1
            logits[row, 0, self.next_token(visible)] = 10.0
        return SimpleNamespace(logits=logits, past_key_values=past_key_values)

    @staticmethod
    def next_token(visible: list[int]) -> int:
        # End after a length that depends on the prompt, so rows leave the batch at different steps.
        if len(visible) >= 2 * sum(visible) % 17 + 20:
            return EOS
        return ord("a") + (sum(t * (i + 1) for i, t in enumerate(visible)) % 26)


def fake_generator(model: FakeModel, *, max_batch: int = 4) -> LocalGenerator:
    local = LocalModel(
        model=model, tokenizer=FakeTokenizer(), eos_ids=frozenset({EOS}), load_seconds=0.0, converted=False
    )
    return LocalGenerator(local, max_batch=max_batch)


@pytest.fixture
def model() -> FakeModel:
    return FakeModel()


@pytest.fixture
def generator(model: FakeModel) -> Iterator[LocalGenerator]:
    gen = fake_generator(model)
    yield gen
    gen.close()


def ask(prompt: str, **options: Any) -> GenerationRequest:
    options.setdefault("temperature", 0.0)
    return GenerationRequest(model="smollm2:135m", prompt=prompt, options=SamplingOptions(**options))


async def collect(gen: LocalGenerator, request: GenerationRequest) -> tuple[str, GenerationResult]:
    pieces: list[str] = []
    async for item in gen.generate(request):
        if isinstance(item, str):
            pieces.append(item)
        else:
            return "".join(pieces), item
    raise AssertionError("no result")


def outcome(text: str, result: GenerationResult) -> tuple[str, str, int, int]:
    return text, result.finish_reason, result.prompt_tokens, result.completion_tokens


async def eventually(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Poll (bounded) until the condition holds; the decode loop runs on another thread."""
    for _ in range(int(timeout_s / 0.002)):
        if condition():
            return
        await asyncio.sleep(0.002)
    raise AssertionError("condition not reached in time")


async def wait_idle(gen: LocalGenerator) -> None:
    await eventually(lambda: gen.active == 0)


PROMPTS = ["hello", "a much longer prompt than the others", "x", "what now?", "zz top", "0123456789"]


async def test_batched_output_equals_solo_output_with_staggered_arrivals(
    generator: LocalGenerator, model: FakeModel
) -> None:
    solo = [await collect(generator, ask(p)) for p in PROMPTS]
    assert max(model.batch_sizes) == 1
    assert len({r.completion_tokens for _, r in solo}) > 2, "rows must leave the batch at different steps"

    async def late(prompt: str, after_calls: int) -> tuple[str, GenerationResult]:
        await eventually(lambda: model.calls >= after_calls)
        return await collect(generator, ask(prompt))

    start = model.calls
    together = await asyncio.gather(*(late(p, start + 3 * i) for i, p in enumerate(PROMPTS)))
    assert [outcome(*r) for r in together] == [outcome(*r) for r in solo]
    assert max(model.batch_sizes) == 4  # max_batch: the other two waited for a free slot


async def test_requests_sent_together_are_prefilled_together(
    generator: LocalGenerator, model: FakeModel
) -> None:
    prompts = PROMPTS[:4]  # prompt lengths 6, 37, 2 and 10: the prefill itself is left-padded
    solo = [outcome(*await collect(generator, ask(p))) for p in prompts]
    assert set(model.prefill_sizes) == {1}
    together = await asyncio.gather(*(collect(generator, ask(p)) for p in prompts))
    assert [outcome(*r) for r in together] == solo
    assert max(model.prefill_sizes) > 1


async def test_results_carry_usage_and_timings(generator: LocalGenerator) -> None:
    text, result = await collect(generator, ask("hello", max_tokens=5))
    assert (result.finish_reason, result.completion_tokens, len(text)) == ("length", 5, 5)
    assert result.prompt_tokens == len("hello>")
    assert result.prompt_eval_ms is not None and result.prompt_eval_ms >= 0
    assert result.total_ms is not None and result.eval_ms is not None
    assert result.total_ms >= result.eval_ms
    stop = text[2:4]
    cut, result = await collect(generator, ask("hello", stop=(stop,)))
    assert (cut, result.finish_reason) == (text[: text.index(stop)], "stop")


async def test_cancel_mid_batch_drops_only_that_row(model: FakeModel) -> None:
    model.delay_s = 0.01
    gen = fake_generator(model)
    try:
        expected = await collect(gen, ask("what now?"))
        stream = gen.generate(ask("x", max_tokens=500))
        other = asyncio.create_task(collect(gen, ask("what now?")))
        assert isinstance(await anext(stream), str)
        await stream.aclose()
        steps_before_cancel = len(model.batch_sizes)
        assert outcome(*await other) == outcome(*expected)
        # At most the step already running when the cancel came still had both rows.
        assert max(model.batch_sizes[steps_before_cancel + 1 :], default=1) == 1
    finally:
        gen.close()


async def test_cancel_stops_within_one_token(model: FakeModel) -> None:
    model.delay_s = 0.02
    gen = fake_generator(model)
    try:
        stream = gen.generate(ask("x" * 5, max_tokens=500))
        for _ in range(3):
            await anext(stream)
        await stream.aclose()
        after_cancel = gen.decoded_tokens
        await wait_idle(gen)
        assert gen.decoded_tokens - after_cancel <= 1
    finally:
        gen.close()


async def test_a_full_queue_is_overloaded(model: FakeModel) -> None:
    model.gate.clear()  # the worker blocks in its first forward pass
    gen = fake_generator(model, max_batch=1)
    streams = [gen.generate(ask("hello")) for _ in range(10)]
    try:
        first = asyncio.create_task(anext(streams[0]))
        await eventually(lambda: model.calls > 0)
        waiting = [asyncio.create_task(anext(s)) for s in streams[1:9]]  # 8 per slot may queue
        await asyncio.sleep(0.05)
        with pytest.raises(SluiceError) as caught:
            await anext(streams[9])
        assert caught.value.code is ErrorCode.OVERLOADED and caught.value.retryable
        model.gate.set()
        await asyncio.gather(first, *waiting)
    finally:
        model.gate.set()
        for stream in streams:
            await stream.aclose()
        gen.close()


async def test_model_failure_is_internal_without_its_text_and_the_loop_goes_on(
    generator: LocalGenerator, model: FakeModel
) -> None:
    model.fail_with = RuntimeError("secret: shape mismatch in layer 3")
    with pytest.raises(SluiceError) as caught:
        await collect(generator, ask("hello"))
    assert caught.value.code is ErrorCode.INTERNAL
    assert "secret" not in caught.value.message
    model.fail_with = None
    assert (await collect(generator, ask("hello")))[1].finish_reason == "stop"


async def test_bad_options_are_invalid_request(generator: LocalGenerator) -> None:
    with pytest.raises(SluiceError) as caught:
        await collect(generator, ask("hello", top_p=2.0))
    assert caught.value.code is ErrorCode.INVALID_REQUEST
    assert "top_p" in caught.value.message


async def test_close_ends_running_requests_and_refuses_new_ones(model: FakeModel) -> None:
    model.delay_s = 0.01
    gen = fake_generator(model)
    running = asyncio.create_task(collect(gen, ask("x", max_tokens=500)))
    await eventually(lambda: model.calls >= 3)
    await asyncio.to_thread(gen.close)
    with pytest.raises(SluiceError) as caught:
        await running
    assert caught.value.code is ErrorCode.SHUTTING_DOWN
    with pytest.raises(SluiceError) as caught:
        await collect(gen, ask("x"))
    assert caught.value.code is ErrorCode.SHUTTING_DOWN


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (MemoryError(), ErrorCode.OVERLOADED),
        (torch.OutOfMemoryError("secret"), ErrorCode.OVERLOADED),
        (FileNotFoundError("/secret/path"), ErrorCode.MODEL_NOT_FOUND),
        (ValueError("secret"), ErrorCode.INTERNAL),
        (KeyError("secret"), ErrorCode.INTERNAL),
    ],
)
def test_map_error(exc: BaseException, code: ErrorCode) -> None:
    mapped = map_error(exc)
    assert mapped.code is code
    assert "secret" not in mapped.message
    same = SluiceError(ErrorCode.TIMEOUT, "t")
    assert map_error(same) is same
