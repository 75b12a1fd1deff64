"""protocol.schema: committed contract files match the code, and real validators accept them.

The AsyncAPI document is checked twice, with the official tools: against the AsyncAPI 3.0.0 JSON
Schema shipped in ``@asyncapi/specs`` (with ``jsonschema``) and by ``@asyncapi/parser`` in node.
Both come from npm into ``tests/protocol/asyncapi/node_modules`` (``npm ci`` on first use).
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from protocol import schema
from protocol.codec import encode
from protocol.errors import ErrorCode
from protocol.messages import (
    Classification,
    Delta,
    Done,
    Embedding,
    Error,
    Goaway,
    LabelScore,
    Limits,
    Models,
    Pong,
    ServerInfo,
    Timings,
    ToolCall,
    Usage,
    Welcome,
)

ROOT = Path(__file__).resolve().parents[2]
CHECKER = Path(__file__).parent / "asyncapi"
NODE_MODULES = CHECKER / "node_modules"


# ---------------------------------------------------------------------------------------------
# committed files


def test_committed_files_match_the_code() -> None:
    for name, text in schema.render().items():
        committed = (ROOT / "protocol" / "schema" / name).read_text(encoding="utf-8")
        assert committed == text, f"protocol/schema/{name} is stale: run `python -m protocol.schema`"


def test_write_and_module_entry_point(tmp_path: Path) -> None:
    written = schema.write(tmp_path / "out")
    assert sorted(p.name for p in written) == ["asyncapi.json", "messages.schema.json"]
    for path in written:
        text = path.read_text(encoding="utf-8")
        assert text.endswith("}\n")
        assert text == json.dumps(json.loads(text), indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    subprocess.run(
        [sys.executable, "-m", "protocol.schema", str(tmp_path / "cli")],
        check=True,
        capture_output=True,
        timeout=60,
    )
    for path in written:
        assert (tmp_path / "cli" / path.name).read_bytes() == path.read_bytes()


def test_generation_is_stable() -> None:
    assert schema.render() == schema.render()


# ---------------------------------------------------------------------------------------------
# JSON Schema


def refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from refs(value)


def resolve(document: dict[str, Any], pointer: str) -> Any:
    assert pointer.startswith("#/"), pointer
    node: Any = document
    for part in pointer[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    document = schema.json_schema()
    jsonschema.Draft202012Validator.check_schema(document)
    return document


def validator(document: dict[str, Any], name: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator({"$ref": f"#/$defs/{name}", "$defs": document["$defs"]})


def test_every_ref_resolves(document: dict[str, Any]) -> None:
    for ref in refs(document):
        assert isinstance(resolve(document, ref), dict)


TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {}}}},
}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}

CLIENT_VALID = [
    {"type": "hello"},
    {"type": "hello", "protocol": 1, "session": "s", "last_seq": 3, "token": "t", "client": "c"},
    {"type": "generate", "id": "a", "prompt": "p"},
    {
        "type": "generate",
        "id": "a" * 64,
        "messages": [{"role": "user", "content": "c"}],
        "options": {"temperature": 2, "top_p": 1, "top_k": 0, "max_tokens": 1, "stop": [], "seed": -1},
        "format": "json",
        "history": True,
        "system": "s",
    },
    {
        "type": "generate",
        "id": "t",
        "prompt": "p",
        "format": {"type": "object", "properties": {"a": {"type": "integer"}}},
        "tools": [TOOL, {"type": "function", "function": {"name": "now", "description": "d"}}],
        "tool_choice": {"type": "function", "function": {"name": "now"}},
    },
    {"type": "generate", "id": "t", "prompt": "p", "tools": [TOOL], "tool_choice": "required"},
    {
        "type": "generate",
        "id": "t",
        "messages": [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": "", "tool_calls": [CALL]},
            {"role": "tool", "content": "sunny", "tool_call_id": "call_1"},
        ],
    },
    {"type": "embed", "id": "e", "input": "x"},
    {"type": "embed", "id": "e", "input": ["x", "y"], "normalize": False, "encoding": "base64"},
    {"type": "classify", "id": "c", "input": "x", "labels": ["a", "b"], "multi_label": True},
    {"type": "cancel", "id": "a"},
    {"type": "ping", "nonce": 3},
    {"type": "ack", "seq": 0},
    {"type": "ping", "unknown": "fields are ignored"},
]

CLIENT_INVALID = [
    {"type": "nope"},
    {"id": "a"},
    {"type": "generate", "id": "a"},
    {"type": "generate", "id": "a", "prompt": "p", "messages": [{"role": "user", "content": "c"}]},
    {"type": "generate", "id": "", "prompt": "p"},
    {"type": "generate", "id": "a" * 65, "prompt": "p"},
    {"type": "generate", "id": 1, "prompt": "p"},
    {"type": "generate", "id": "a", "prompt": "p", "options": {"temperature": 3}},
    {"type": "generate", "id": "a", "prompt": "p", "options": {"top_p": 0}},
    {"type": "generate", "id": "a", "messages": [{"role": "bot", "content": "c"}]},
    {"type": "generate", "id": "a", "prompt": "p", "format": "yaml"},
    {"type": "generate", "id": "a", "prompt": "p", "format": [1]},
    {"type": "generate", "id": "a", "prompt": "p", "tools": []},
    {"type": "generate", "id": "a", "prompt": "p", "tools": [{"function": {"name": "f"}}]},
    {
        "type": "generate",
        "id": "a",
        "prompt": "p",
        "tools": [{"type": "function", "function": {"name": "a b"}}],
    },
    {
        "type": "generate",
        "id": "a",
        "prompt": "p",
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}],
    },
    {"type": "generate", "id": "a", "prompt": "p", "tools": [TOOL], "tool_choice": "always"},
    {"type": "generate", "id": "a", "messages": [{"role": "assistant", "content": "", "tool_calls": [{}]}]},
    {"type": "embed", "id": "e", "input": []},
    {"type": "embed", "id": "e", "input": "x", "encoding": "hex"},
    {"type": "classify", "id": "c", "input": "x", "labels": ["a"]},
    {"type": "classify", "id": "c", "input": "x", "labels": ["a", "a"]},
    {"type": "cancel"},
    {"type": "ack", "seq": -1},
    {"type": "hello", "last_seq": -1},
]


@pytest.mark.parametrize("message", CLIENT_VALID)
def test_schema_accepts_valid_client_messages(document: dict[str, Any], message: dict[str, Any]) -> None:
    validator(document, "ClientMessage").validate(message)
    jsonschema.Draft202012Validator(document).validate(message)


@pytest.mark.parametrize("message", CLIENT_INVALID)
def test_schema_refuses_invalid_client_messages(document: dict[str, Any], message: dict[str, Any]) -> None:
    assert not validator(document, "ClientMessage").is_valid(message)


TIMINGS = Timings(queue_ms=1.0, ttft_ms=None, total_ms=2.0)
SERVER_SAMPLES = [
    Welcome(
        session="s",
        resumed=False,
        last_seq=0,
        server=ServerInfo(version="0.1.0"),
        limits=Limits(max_message_bytes=1, max_inflight=1, replay_events=1, session_ttl_s=1),
        models=Models(generate=["g"], embed=["e"], classify=["c"]),
    ),
    Pong(),
    Pong(nonce="n"),
]
LOGGED_SAMPLES = [
    Delta(id="a", seq=1, text="t"),
    Done(
        id="a",
        seq=2,
        finish_reason="cancelled",
        usage=Usage(prompt_tokens=1, completion_tokens=0),
        timings=TIMINGS,
        model="m",
    ),
    Embedding(id="e", seq=3, model="m", dimensions=2, embeddings=[[0.1, 0.2]]),
    Embedding(id="e", seq=4, model="m", dimensions=2, embeddings=["AAAAAAAAAAA="]),
    Classification(id="c", seq=5, model="m", results=[[LabelScore(label="a", score=1.0)]]),
    Error(seq=6, ref="r", code=ErrorCode.INVALID_MESSAGE, message="m", retryable=False),
    Error(id="a", seq=7, code=ErrorCode.RATE_LIMITED, message="m", retryable=True, retry_after_ms=5),
    Goaway(seq=8, reason="r", retry_after_ms=1),
    ToolCall(id="a", seq=9, index=0, call_id="call_1", name="f", arguments='{"x": 1}'),
]


@pytest.mark.parametrize("message", SERVER_SAMPLES + LOGGED_SAMPLES, ids=lambda m: m.type)
def test_encoded_server_messages_match_the_schema(document: dict[str, Any], message: Any) -> None:
    wire = json.loads(encode(message))
    validator(document, "ServerMessage").validate(wire)
    assert validator(document, "LoggedMessage").is_valid(wire) == (message in LOGGED_SAMPLES)
    assert not validator(document, "ClientMessage").is_valid(wire)


@pytest.mark.parametrize(
    "wire",
    [
        {"type": "delta", "id": "a", "seq": 1},  # missing text
        {"type": "delta", "id": "a", "seq": 1, "text": "t", "extra": 1},  # server messages are closed
        {"type": "error", "id": None, "seq": 1, "code": "internal", "message": "m", "retryable": False},
        {"type": "error", "seq": 1, "code": "oops", "message": "m", "retryable": False},
        {
            "type": "done",
            "id": "a",
            "seq": 1,
            "finish_reason": "eof",
            "usage": {},
            "timings": {},
            "model": "m",
        },
        {"type": "pong", "nonce": None},
    ],
)
def test_schema_refuses_what_the_server_never_sends(document: dict[str, Any], wire: dict[str, Any]) -> None:
    assert not validator(document, "ServerMessage").is_valid(wire)


# ---------------------------------------------------------------------------------------------
# AsyncAPI


@pytest.fixture(scope="module")
def asyncapi_tools() -> Path:
    if not (NODE_MODULES / "@asyncapi" / "parser").is_dir():
        npm = shutil.which("npm")
        assert npm is not None, "npm is needed to fetch the official AsyncAPI validator"
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=CHECKER,
            check=True,
            timeout=300,
            capture_output=True,
        )
    return NODE_MODULES


def parse_with_node(tmp_path: Path, document: dict[str, Any]) -> tuple[int, list[dict[str, Any]]]:
    node = shutil.which("node")
    assert node is not None, "node is needed to run the official AsyncAPI parser"
    path = tmp_path / "asyncapi.json"
    path.write_text(json.dumps(document), encoding="utf-8")
    result = subprocess.run(
        [node, str(CHECKER / "validate.mjs"), str(path)], capture_output=True, text=True, timeout=120
    )
    assert result.stdout, result.stderr
    return result.returncode, json.loads(result.stdout)


def official_schema(tools: Path) -> dict[str, Any]:
    path = tools / "@asyncapi" / "specs" / "schemas" / "3.0.0-without-$id.json"
    loaded: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return loaded


def test_asyncapi_is_valid_against_the_official_json_schema(asyncapi_tools: Path) -> None:
    checker = jsonschema.Draft7Validator(official_schema(asyncapi_tools))
    errors = [f"{list(e.absolute_path)}: {e.message[:200]}" for e in checker.iter_errors(schema.asyncapi())]
    assert errors == []


def test_asyncapi_passes_the_official_parser(asyncapi_tools: Path, tmp_path: Path) -> None:
    code, diagnostics = parse_with_node(tmp_path, schema.asyncapi())
    problems = [d for d in diagnostics if d["severity"] <= 1]  # errors and warnings
    assert (code, problems) == (0, [])


def test_validators_do_catch_a_broken_document(asyncapi_tools: Path, tmp_path: Path) -> None:
    broken = copy.deepcopy(schema.asyncapi())
    broken["operations"]["sendWebSocket"]["action"] = "publish"  # AsyncAPI 2 wording, invalid in 3
    assert not jsonschema.Draft7Validator(official_schema(asyncapi_tools)).is_valid(broken)
    code, diagnostics = parse_with_node(tmp_path, broken)
    assert code == 1 and any(d["severity"] == 0 for d in diagnostics)
    dangling = copy.deepcopy(schema.asyncapi())
    dangling["channels"]["websocket"]["messages"]["delta"] = {"$ref": "#/components/messages/nothing"}
    code, diagnostics = parse_with_node(tmp_path, dangling)
    assert code == 1


def test_asyncapi_describes_every_message_on_the_right_channels() -> None:
    document = schema.asyncapi()
    for ref in refs(document):
        assert isinstance(resolve(document, ref), dict), ref
    channels = document["channels"]
    client = {"hello", "generate", "embed", "classify", "cancel", "ping", "ack"}
    server = {
        "welcome",
        "delta",
        "tool_call",
        "done",
        "embedding",
        "classification",
        "error",
        "pong",
        "goaway",
    }
    logged = server - {"welcome", "pong"}
    assert channels["websocket"]["address"] == "/v1/ws"
    assert set(channels["websocket"]["messages"]) == client | server
    assert channels["sessionEvents"]["address"] == "/v1/sessions/{session}/events"
    assert set(channels["sessionEvents"]["messages"]) == logged
    assert channels["sessionMessages"]["address"] == "/v1/sessions/{session}/messages"
    assert set(channels["sessionMessages"]["messages"]) == client - {"hello"}
    assert set(document["components"]["messages"]) == client | server
    operations = document["operations"]
    assert operations["sendSessionEvents"]["action"] == "send"
    assert operations["receiveSessionMessages"]["action"] == "receive"
