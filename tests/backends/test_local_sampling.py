"""Sampling options and token choice of the local model (`server.backends.local_sampling`)."""

from __future__ import annotations

import pytest
import torch

from server.backends.base import SamplingOptions
from server.backends.local_sampling import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_P,
    InvalidOptions,
    Sampling,
    resolve,
    sample,
)


def sampling(**options: object) -> Sampling:
    return resolve(SamplingOptions(**options), max_context=2048)  # type: ignore[arg-type]


def draws(logits: torch.Tensor, chosen: Sampling, n: int) -> list[int]:
    generator = chosen.generator()
    return [sample(logits, chosen, generator) for _ in range(n)]


def test_defaults_are_the_model_cards() -> None:
    chosen = sampling()
    assert (chosen.temperature, chosen.top_p, chosen.top_k) == (DEFAULT_TEMPERATURE, DEFAULT_TOP_P, 0)
    assert chosen.max_tokens == DEFAULT_MAX_TOKENS
    assert not chosen.greedy
    assert sampling(temperature=0.0).greedy


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"max_tokens": 0}, "max_tokens"),
    ],
)
def test_bad_options_name_the_field(options: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidOptions, match=field):
        sampling(**options)


def test_max_tokens_is_capped_to_the_context_and_empty_stops_dropped() -> None:
    chosen = sampling(max_tokens=32768, stop=("", "###"))
    assert chosen.max_tokens == 2047
    assert chosen.stop == ("###",)


def test_any_integer_seed_is_accepted() -> None:
    for seed in (-1, 0, 2**70):
        chosen = sampling(seed=seed)
        assert chosen.generator().initial_seed() == seed % 2**64


def test_greedy_and_top_k_1_pick_the_argmax() -> None:
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    assert draws(logits, sampling(temperature=0.0), 5) == [1] * 5
    assert draws(logits, sampling(temperature=1.5, top_k=1, seed=1), 20) == [1] * 20


def test_top_p_keeps_only_the_head_that_reaches_it() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert set(draws(logits, sampling(temperature=1.0, top_p=0.5, seed=2), 50)) == {0}
    assert set(draws(logits, sampling(temperature=1.0, top_p=0.75, seed=2), 200)) == {0, 1}


def test_top_k_limits_the_candidates() -> None:
    logits = torch.zeros(50)
    logits[[7, 8, 9]] = 1.0
    assert set(draws(logits, sampling(temperature=1.0, top_p=1.0, top_k=3, seed=3), 200)) == {7, 8, 9}


def test_a_seed_reproduces_the_draws_and_another_seed_does_not() -> None:
    logits = torch.zeros(1000)
    first = draws(logits, sampling(temperature=1.0, top_p=1.0, seed=42), 30)
    assert draws(logits, sampling(temperature=1.0, top_p=1.0, seed=42), 30) == first
    assert draws(logits, sampling(temperature=1.0, top_p=1.0, seed=43), 30) != first
