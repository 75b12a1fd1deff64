"""Python arguments → protocol requests: options given as keywords, as ``options={...}``, or both."""

from __future__ import annotations

import pytest
from sluice_client import ErrorCode, SluiceError
from sluice_client.build import generate_options, generate_request

from protocol.messages import GenerateOptions


def test_options_dict_and_keywords_merge() -> None:
    merged = generate_options({"temperature": 0.2, "stop": "\n"}, {"max_tokens": 5, "seed": 7})
    assert merged == GenerateOptions(temperature=0.2, stop=["\n"], max_tokens=5, seed=7)
    assert generate_options(None, {"top_k": 3}) == GenerateOptions(top_k=3)
    assert generate_options(GenerateOptions(top_p=0.5), {"seed": 1}) == GenerateOptions(top_p=0.5, seed=1)
    assert generate_options({}, {}) == GenerateOptions()
    assert generate_options({"stop": ("a", "b")}, {}).stop == ["a", "b"]


def test_unknown_option_names_are_a_type_error_naming_them() -> None:
    with pytest.raises(
        TypeError, match=r"in options=: num_ctx, num_predict .*num_predict is called max_tokens"
    ):
        generate_options({"num_predict": 5, "num_ctx": 2048, "temperature": 0.1}, {})
    with pytest.raises(TypeError, match="keyword: tempreature"):
        generate_options(None, {"tempreature": 0.1})
    with pytest.raises(TypeError, match="options must be a dict"):
        generate_options([("temperature", 0.1)], {})  # type: ignore[arg-type]


def test_an_option_given_twice_is_a_type_error_even_when_equal() -> None:
    with pytest.raises(TypeError, match="both in options= and as keywords: max_tokens, temperature"):
        generate_options({"temperature": 0.1, "max_tokens": 4}, {"temperature": 0.1, "max_tokens": 4})


def test_bad_option_values_name_the_option() -> None:
    with pytest.raises(SluiceError) as hot:
        generate_options({"temperature": 5.0}, {})
    assert hot.value.code is ErrorCode.INVALID_MESSAGE
    assert hot.value.message.startswith("invalid options.temperature:")
    with pytest.raises(SluiceError, match=r"options\.max_tokens"):
        generate_options(None, {"max_tokens": 0})


def test_request_carries_the_merged_options() -> None:
    options = generate_options({"temperature": 0.3}, {"max_tokens": 9})
    request = generate_request(
        "g-1",
        prompt="hi",
        messages=None,
        model=None,
        system=None,
        history=False,
        format=None,
        tools=None,
        tool_choice=None,
        options=options,
    )
    assert request.options == GenerateOptions(temperature=0.3, max_tokens=9)
