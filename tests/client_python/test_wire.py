"""The client's codec: lenient decoding of server messages, base64 vectors, HTTP error bodies."""

from __future__ import annotations

import base64

import numpy as np
import orjson
import pytest
from sluice_client.errors import from_status
from sluice_client.wire import Unknown, WireError, decode, encode, vectors

from protocol.codec import encode as server_encode
from protocol.errors import ErrorCode
from protocol.messages import Delta, Done, Embedding, Error, Generate, GenerateOptions, ToolCall, Welcome


def test_decodes_what_the_server_encodes() -> None:
    done = Done(
        id="a",
        seq=3,
        finish_reason="stop",
        usage={"prompt_tokens": 1, "completion_tokens": 2},
        timings={"queue_ms": 0.5, "ttft_ms": None, "total_ms": 9.0},
        model="m",
    )
    assert decode(server_encode(done)) == done
    assert decode(server_encode(Delta(id="a", seq=4, text="é"))) == Delta(id="a", seq=4, text="é")
    call = ToolCall(id="a", seq=5, index=1, call_id="call-9", name="get_weather", arguments='{"city":"Oslo"}')
    assert decode(server_encode(call)) == call
    newer = orjson.loads(server_encode(call)) | {"kind": "function"}
    assert decode(orjson.dumps(newer)) == call


def test_unknown_fields_are_ignored_at_every_level() -> None:
    raw = {
        "type": "welcome",
        "session": "s",
        "resumed": False,
        "last_seq": 0,
        "protocol": 1,
        "server": {"name": "sluice", "version": "9", "build": "x"},
        "limits": {
            "max_message_bytes": 1,
            "max_inflight": 2,
            "replay_events": 3,
            "session_ttl_s": 4,
            "new": 5,
        },
        "models": {"generate": [], "embed": [], "classify": [], "rerank": []},
        "region": "eu",
    }
    welcome = decode(orjson.dumps(raw))
    assert isinstance(welcome, Welcome) and welcome.limits.max_inflight == 2
    scores = {
        "type": "classification",
        "id": "c",
        "seq": 1,
        "model": "m",
        "results": [[{"label": "a", "score": 1, "x": 0}]],
    }
    assert decode(orjson.dumps(scores)).results[0][0].label == "a"  # type: ignore[union-attr]


def test_unknown_types_and_codes() -> None:
    assert decode('{"type":"hint","seq":5}') == Unknown("hint", 5)
    error = decode('{"type":"error","seq":1,"code":"brand_new","message":"m","retryable":true}')
    assert isinstance(error, Error) and error.code is ErrorCode.INTERNAL and error.message == "m"
    for bad in ("nope", "[1]", '{"seq":1}', '{"type":"done","id":"a","seq":"x"}'):
        with pytest.raises(WireError):
            decode(bad)


def test_client_messages_leave_out_unset_fields() -> None:
    message = Generate(type="generate", id="g", prompt="hi", options=GenerateOptions(max_tokens=5))
    assert orjson.loads(encode(message)) == {
        "type": "generate",
        "id": "g",
        "prompt": "hi",
        "options": {"max_tokens": 5},
        "history": False,
    }


def test_vectors_from_base64_and_floats() -> None:
    matrix = np.array([[0.5, -1.25, 3.0], [1e-8, 2.0, -0.0]], dtype=np.float32)
    rows = [base64.b64encode(row.astype("<f4").tobytes()).decode() for row in matrix]
    decoded = vectors(Embedding(id="e", seq=1, model="m", dimensions=3, embeddings=rows))
    np.testing.assert_array_equal(decoded, matrix)
    assert decoded.dtype == np.float32 and decoded.flags.writeable
    as_floats = vectors(Embedding(id="e", seq=1, model="m", dimensions=3, embeddings=matrix.tolist()))
    np.testing.assert_array_equal(as_floats, matrix)
    with pytest.raises(WireError):
        vectors(Embedding(id="e", seq=1, model="m", dimensions=4, embeddings=rows))


def test_http_errors() -> None:
    typed = from_status(
        429, {"error": {"code": "rate_limited", "message": "slow down", "retry_after_ms": 900}}
    )
    assert typed.code is ErrorCode.RATE_LIMITED and typed.retryable and typed.retry_after_ms == 900
    assert from_status(401, None).code is ErrorCode.UNAUTHORIZED
    untyped = from_status(503, "<html>", retry_after_s="2")
    assert untyped.code is ErrorCode.OVERLOADED and untyped.retry_after_ms == 2000 and untyped.retryable
