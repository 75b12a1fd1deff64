"""How the engine for the local model's constrained decoding was chosen: llguidance, xgrammar and
outlines-core side by side on SmolLM2's tokenizer (vocabulary 49,152), on this CPU.

For each JSON Schema case (one keyword or feature each) an engine compiles the schema, then a
valid and an invalid instance (compact JSON, tokenized by SmolLM2's tokenizer) are fed token by
token, computing the token mask before every token. A case is ``enforced`` when the valid one
passes and the invalid one is stopped, ``ignored`` when the invalid one passes too (the keyword
is silently not enforced), ``refused`` when compiling fails (the engine says so), ``broken``
when the valid one is stopped. Mask time per step is taken over the valid instances' tokens.

Only llguidance is a dependency of sluice; to compare, install the others beside it, e.g.
``pip install --no-deps --target /tmp/engines xgrammar apache-tvm-ffi outlines-core`` and run
``PYTHONPATH=/tmp/engines python -m bench.constrained_engines [--json PATH]``. An engine that
does not import is reported as missing. Results: bench/results/constrained_engines.json.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import torch

__all__ = ["CASES", "main"]

_TOKENIZER = Path.home() / ".cache/sluice/models/smollm2-135m-instruct"

# name: (schema, a valid instance, an invalid instance)
CASES: dict[str, tuple[Any, Any, Any]] = {
    "nested objects, required, additionalProperties": (
        {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "address": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city"],
                    "additionalProperties": False,
                },
            },
            "required": ["name", "address"],
            "additionalProperties": False,
        },
        {"name": "Ann", "address": {"city": "Oslo", "zip": "0150"}},
        {"name": "Ann", "address": {"zip": "0150"}},
    ),
    "enum": ({"type": "string", "enum": ["red", "green", "blue"]}, "green", "pink"),
    "array minItems/maxItems": (
        {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 3},
        [1, 2, 3],
        [1],
    ),
    "integer minimum/maximum": ({"type": "integer", "minimum": 1, "maximum": 10}, 7, 11),
    "number minimum/maximum": ({"type": "number", "minimum": 0, "maximum": 1}, 0.25, 1.5),
    "boolean": ({"type": "boolean"}, True, "yes"),
    "string pattern": ({"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}, "ABC-12", "abc-12"),
    "format date-time": ({"type": "string", "format": "date-time"}, "2026-12-01T10:00:00Z", "yesterday"),
    "format email": ({"type": "string", "format": "email"}, "a@b.io", "not an email"),
    "format uuid": ({"type": "string", "format": "uuid"}, "123e4567-e89b-12d3-a456-426614174000", "xyz"),
    "minLength/maxLength": ({"type": "string", "minLength": 2, "maxLength": 4}, "abc", "abcdef"),
    "anyOf": ({"anyOf": [{"type": "integer"}, {"type": "string"}]}, 3, True),
    "oneOf": ({"oneOf": [{"type": "integer"}, {"type": "boolean"}]}, False, "x"),
    "$ref/$defs": (
        {
            "$defs": {"p": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}},
            "type": "object",
            "properties": {"a": {"$ref": "#/$defs/p"}},
            "required": ["a"],
        },
        {"a": {"x": 1}},
        {"a": {"x": "1"}},
    ),
    "const": ({"const": "fixed"}, "fixed", "other"),
    "type list with null": ({"type": ["string", "null"]}, None, 1),
    "exclusiveMinimum": ({"type": "integer", "exclusiveMinimum": 0}, 1, 0),
    "multipleOf": ({"type": "integer", "multipleOf": 5}, 10, 7),
    "minProperties": ({"type": "object", "minProperties": 1}, {"a": 1}, {}),
    "patternProperties": (
        {"type": "object", "patternProperties": {"^x": {"type": "integer"}}, "additionalProperties": False},
        {"xa": 1},
        {"xa": "s"},
    ),
    "uniqueItems": ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, [1, 2], [1, 1]),
    "not": ({"not": {"type": "string"}}, 1, "s"),
    "if/then/else": ({"if": {"type": "integer"}, "then": {"minimum": 5}, "else": {"type": "string"}}, 6, 2),
    "contains": ({"type": "array", "contains": {"const": 3}}, [1, 3], [1, 2]),
    "long strings (mask timing)": (
        {"type": "array", "items": {"type": "string", "maxLength": 40}},
        ["the quick brown fox", "jumps over the lazy dog", "a lighthouse keeper's long story"] * 3,
        [1],
    ),
}


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


class _Llguidance:
    package = "llguidance"

    def __init__(self, tokenizer: Any) -> None:
        import llguidance
        import llguidance.hf

        self.lib = llguidance
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer)
        self.bits = torch.zeros((len(tokenizer) + 31) // 32, dtype=torch.int32)

    def compile(self, schema: Any) -> Any:
        grammar = self.lib.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        matcher = self.lib.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return matcher

    def start(self, compiled: Any) -> Any:
        return compiled.deep_copy()

    def mask(self, state: Any) -> None:
        state.unsafe_compute_mask_ptr(self.bits.data_ptr(), self.bits.numel() * 4)

    def advance(self, state: Any, token: int) -> bool:
        return bool(state.consume_token(token)) and not state.is_error()

    def accepting(self, state: Any) -> bool:
        return bool(state.is_accepting())


class _Xgrammar:
    package = "xgrammar"

    def __init__(self, tokenizer: Any) -> None:
        import xgrammar

        self.lib = xgrammar
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=len(tokenizer))
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=1)
        self.bits = xgrammar.allocate_token_bitmask(1, len(tokenizer))
        self.eos = tokenizer.eos_token_id

    def compile(self, schema: Any) -> Any:
        return self.compiler.compile_json_schema(
            json.dumps(schema), any_whitespace=False, separators=(",", ":")
        )

    def start(self, compiled: Any) -> Any:
        return self.lib.GrammarMatcher(compiled)

    def mask(self, state: Any) -> None:
        state.fill_next_token_bitmask(self.bits, 0)

    def advance(self, state: Any, token: int) -> bool:
        return bool(state.accept_token(token))

    def accepting(self, state: Any) -> bool:
        return bool(state.is_completed() or state.accept_token(self.eos))


class _OutlinesCore:
    package = "outlines-core"

    def __init__(self, tokenizer: Any) -> None:
        import outlines_core

        self.lib = outlines_core
        self.eos = tokenizer.eos_token_id
        byte_of = _byte_decoder()
        vocabulary: dict[bytes, list[int]] = {}
        special = set(tokenizer.all_special_ids)
        for text, token in tokenizer.get_vocab().items():
            if token in special:
                continue
            try:
                raw = bytes(byte_of[c] for c in text)
            except KeyError:
                raw = text.encode()
            vocabulary.setdefault(raw, []).append(token)
        self.vocabulary = outlines_core.Vocabulary(self.eos, vocabulary)
        self.bits = torch.zeros((1, (len(tokenizer) + 31) // 32), dtype=torch.int32)

    def compile(self, schema: Any) -> Any:
        regex = self.lib.json_schema.build_regex_from_schema(json.dumps(schema))
        return self.lib.Index(regex, self.vocabulary)

    def start(self, compiled: Any) -> Any:
        return self.lib.Guide(compiled)

    def mask(self, state: Any) -> None:
        state.write_mask_into(self.bits.data_ptr(), self.bits.numel(), 4)

    def advance(self, state: Any, token: int) -> bool:
        try:
            state.advance(token)
        except ValueError:
            return False
        return True

    def accepting(self, state: Any) -> bool:
        return bool(state.is_finished() or self.eos in state.get_tokens())


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character standing for each byte."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def _measure(engine_type: type[Any], tokenizer: Any) -> dict[str, Any]:
    started = time.perf_counter()
    engine = engine_type(tokenizer)
    out: dict[str, Any] = {"tokenizer_setup_s": round(time.perf_counter() - started, 3), "cases": {}}
    steps: list[float] = []
    for name, (schema, valid, invalid) in CASES.items():
        try:
            started = time.perf_counter()
            compiled = engine.compile(schema)
            compile_ms = round((time.perf_counter() - started) * 1000, 2)
        except Exception as exc:  # the engine's refusal, whatever its type
            out["cases"][name] = {"verdict": "refused", "message": str(exc).strip()[:160]}
            continue

        def passes(value: Any, timings: list[float] | None, compiled: Any = compiled) -> bool:
            state = engine.start(compiled)
            for token in tokenizer(_compact(value), add_special_tokens=False)["input_ids"]:
                begun = time.perf_counter_ns()
                engine.mask(state)
                if timings is not None:
                    timings.append((time.perf_counter_ns() - begun) / 1000)
                if not engine.advance(state, token):
                    return False
            engine.mask(state)
            return bool(engine.accepting(state))

        valid_ok, invalid_ok = passes(valid, steps), passes(invalid, None)
        verdict = "broken" if not valid_ok else "ignored" if invalid_ok else "enforced"
        out["cases"][name] = {"verdict": verdict, "compile_ms": compile_ms}
    steps.sort()
    out["mask_us_per_step"] = {
        "steps": len(steps),
        "median": round(statistics.median(steps), 1),
        "p90": round(steps[int(len(steps) * 0.9)], 1),
        "max": round(steps[-1], 1),
    }
    verdicts = [case["verdict"] for case in out["cases"].values()]
    out["summary"] = {v: verdicts.count(v) for v in ("enforced", "refused", "ignored", "broken")}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(_TOKENIZER)
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        "unknown",
    )
    result: dict[str, Any] = {"cpu": cpu, "vocabulary": len(tokenizer), "engines": {}}
    for engine_type in (_Llguidance, _Xgrammar, _OutlinesCore):
        try:
            version = importlib.metadata.version(engine_type.package)
            figures = _measure(engine_type, tokenizer)
        except ImportError as exc:
            result["engines"][engine_type.package] = {"missing": str(exc)}
            continue
        result["engines"][engine_type.package] = {"version": version, **figures}
        print(engine_type.package, version, figures["summary"], figures["mask_us_per_step"], flush=True)
    if args.json:
        args.json.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
