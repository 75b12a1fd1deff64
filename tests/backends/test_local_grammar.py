"""The grammar adapter (`server.backends.local_grammar`) with a small byte-level BPE tokenizer.

The tokenizer is trained here in milliseconds (no model needed), so these tests are fast. A
"random walk" samples the argmax of random logits through the mask until the grammar ends: every
text it can produce must be an instance of the schema, whatever the logits were.
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from server.backends.base import GenerationRequest, Tool, ToolChoice
from server.backends.local_grammar import Constraint, GrammarError, Grammars, json_block
from server.backends.local_tools import parse_calls, plan

EOS = "<|im_end|>"
CORPUS = [
    '{"name": "Ann", "age": 31, "tags": ["a", "b"], "ok": true, "score": 0.5}',
    '<tool_call>[{"name": "get_weather", "arguments": {"city": "Oslo"}}]</tool_call>',
    "The quick brown fox jumps over the lazy dog. Paris is the capital of France.",
    "red green blue celsius fahrenheit null false 0123456789 -+.eE",
]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(CORPUS * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS)


@pytest.fixture(scope="module")
def grammars(tokenizer: PreTrainedTokenizerFast) -> Grammars:
    return Grammars.for_tokenizer(tokenizer, [tokenizer.eos_token_id])


def walk(constraint: Constraint, tokenizer: Any, seed: int, max_steps: int = 2000) -> str:
    """Sample argmax(random logits) under the mask until the grammar ends; the text produced."""
    generator = torch.Generator().manual_seed(seed)
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for _ in range(max_steps):
        logits = constraint.mask(torch.randn(len(tokenizer), generator=generator))
        token = int(logits.argmax())
        if token == eos:
            assert constraint.accepting
            break
        constraint.advance(token)
        ids.append(token)
        if constraint.complete:
            break
    else:
        raise AssertionError("the grammar did not end")
    text: str = tokenizer.decode(ids)
    return text


SCHEMAS: list[dict[str, Any]] = [
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 8},
            "address": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 6}, "zip": {"type": "integer"}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
        "required": ["name", "address"],
        "additionalProperties": False,
    },
    {"type": "string", "enum": ["red", "green", "blue"]},
    {
        "type": "array",
        "items": {"type": "integer", "minimum": -5, "maximum": 5},
        "minItems": 2,
        "maxItems": 4,
    },
    {"type": "number", "minimum": 0, "maximum": 1},
    {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "n": {"type": "null"}},
        "required": ["ok", "n"],
    },
    {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
    {"anyOf": [{"type": "integer", "multipleOf": 3}, {"const": "none"}]},
    {"type": "object", "properties": {"when": {"type": "string", "format": "date"}}, "required": ["when"]},
]


@pytest.mark.parametrize("schema", SCHEMAS, ids=lambda s: json.dumps(s)[:40])
def test_every_walk_through_the_mask_is_an_instance(grammars: Grammars, tokenizer: Any, schema: Any) -> None:
    grammars.check(schema, "format")
    for seed in range(8):
        text = walk(grammars.constraint(f"start: {json_block(schema)}"), tokenizer, seed)
        jsonschema.validate(json.loads(text), schema)


def test_a_valid_instance_passes_and_an_invalid_one_is_masked(grammars: Grammars, tokenizer: Any) -> None:
    schema = {
        "type": "object",
        "properties": {"age": {"type": "integer", "maximum": 99}},
        "required": ["age"],
    }
    grammar = f"start: {json_block(schema)}"

    def allowed_all(text: str) -> bool:
        constraint = grammars.constraint(grammar)
        for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
            if constraint.mask(torch.zeros(len(tokenizer)))[token] == float("-inf"):
                return False
            constraint.advance(token)
        return constraint.accepting

    assert allowed_all('{"age": 42}')
    assert not allowed_all('{"age": 420}')
    assert not allowed_all('{"age": "42"}')
    assert not allowed_all('{"age": 42')


def test_logits_past_the_vocabulary_are_never_allowed(grammars: Grammars, tokenizer: Any) -> None:
    constraint = grammars.constraint('start: "x"')
    logits = constraint.mask(torch.zeros(len(tokenizer) + 64))
    assert torch.isinf(logits[len(tokenizer) :]).all()
    assert int(torch.isfinite(logits).sum()) >= 1


@pytest.mark.parametrize(
    ("schema", "named"),
    [
        ({"type": "array", "uniqueItems": True}, "uniqueItems"),
        ({"if": {"type": "integer"}, "then": {"minimum": 1}}, "if, then"),
        ({"type": "array", "contains": {"const": 1}}, "contains"),
        ({"not": {"type": "string"}}, "not"),
        # A client cannot switch the engine to lenient mode through the schema.
        ({"type": "array", "uniqueItems": True, "x-guidance": {"lenient": True}}, "uniqueItems"),
    ],
)
def test_a_keyword_the_engine_cannot_enforce_is_named(grammars: Grammars, schema: Any, named: str) -> None:
    with pytest.raises(GrammarError) as caught:
        grammars.check(schema, "format")
    assert str(caught.value).startswith("format: the embedded model cannot enforce")
    assert named in str(caught.value)


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "nonsense"},
        {"type": "integer", "minimum": "x"},
        {"required": 3},
        {"$ref": "#/$defs/missing"},
        {"type": "string", "pattern": "(("},
        {"type": "string", "format": "no-such-format"},
        {"type": "object", "properties": {"a": {}}, "required": ["b"], "additionalProperties": False},
    ],
)
def test_an_invalid_schema_is_a_grammar_error_naming_the_field(grammars: Grammars, schema: Any) -> None:
    with pytest.raises(GrammarError, match=r"^tools\[2\]\.parameters: invalid or unsupported JSON Schema"):
        grammars.check(schema, "tools[2].parameters")


def test_compiled_grammars_are_cached_and_constraints_independent(
    grammars: Grammars, tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    grammar = f"start: {json_block({'type': 'string', 'enum': ['red', 'blue']})}"
    compiles = 0
    original = grammars._compile

    def counting(text: str) -> Any:
        nonlocal compiles
        compiles += 1
        return original(text)

    monkeypatch.setattr(grammars, "_compile", counting)
    first, second = grammars.constraint(grammar), grammars.constraint(grammar)
    assert compiles == 1
    for token in tokenizer('"red"', add_special_tokens=False)["input_ids"]:
        first.advance(token)
    assert first.complete and not second.complete
    assert walk(second, tokenizer, seed=3) in ('"red"', '"blue"')

    # A refused schema is cached too, and each refusal is a fresh error.
    errors = []
    for _ in range(2):
        with pytest.raises(GrammarError) as caught:
            grammars.check({"type": "array", "uniqueItems": True, "maxItems": 7}, "format")
        errors.append(caught.value)
    assert compiles == 2 and errors[0] is not errors[1]


def request(**fields: Any) -> GenerationRequest:
    return GenerationRequest(model="smollm2:135m", prompt="hi", **fields)


WEATHER = Tool(
    "get_weather",
    "Weather in a city",
    {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 10},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        },
        "required": ["city", "unit"],
        "additionalProperties": False,
    },
)
CLOCK = Tool("get_time", None, {"type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}}})


@pytest.mark.parametrize("choice", [ToolChoice("required"), ToolChoice("required", "get_time")])
def test_a_forced_call_is_a_listed_tool_with_valid_arguments(
    grammars: Grammars, tokenizer: Any, choice: ToolChoice
) -> None:
    output = plan(request(tools=(WEATHER, CLOCK), tool_choice=choice))
    assert output.calls == "forced" and output.grammar is not None
    by_name = {tool.name: tool for tool in (WEATHER, CLOCK)}
    names = set()
    for seed in range(8):
        calls = parse_calls(walk(grammars.constraint(output.grammar), tokenizer, seed))
        assert calls
        for call in calls:
            assert call.name in by_name and call.name == (choice.name or call.name)
            jsonschema.validate(json.loads(call.arguments), by_name[call.name].parameters or {})
            names.add(call.name)
    assert names == ({choice.name} if choice.name else {"get_weather", "get_time"})


def test_auto_allows_text_that_does_not_begin_with_a_call_or_a_call(
    grammars: Grammars, tokenizer: Any
) -> None:
    output = plan(request(tools=(WEATHER,)))
    assert output.calls == "auto" and output.grammar is not None

    def allowed(text: str) -> bool:
        constraint = grammars.constraint(output.grammar or "")
        for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
            if constraint.mask(torch.zeros(len(tokenizer)))[token] == float("-inf"):
                return False
            constraint.advance(token)
        return constraint.accepting

    assert allowed("The capital of France is Paris.")
    assert allowed(
        '<tool_call>[{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}]</tool_call>'
    )
    assert not allowed('<tool_call>[{"name": "get_wetter", "arguments": {}}]</tool_call>')
    assert not allowed("<b>bold</b>")


def test_auto_with_a_format_gives_a_call_or_an_instance(grammars: Grammars, tokenizer: Any) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    output = plan(request(tools=(WEATHER,), format=schema))
    kinds = set()
    for seed in range(16):
        text = walk(grammars.constraint(output.grammar or ""), tokenizer, seed)
        if text.startswith("<"):
            calls = parse_calls(text)
            assert calls and all(call.name == "get_weather" for call in calls)
            kinds.add("call")
        else:
            jsonschema.validate(json.loads(text), schema)
            kinds.add("instance")
    assert kinds == {"call", "instance"}
