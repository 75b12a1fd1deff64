"""protocol.codec: every client message valid and invalid, typed errors, and byte-exact encoding."""

from __future__ import annotations

import time
from typing import Any

import orjson
import pytest

from protocol.codec import decode, encode, encode_delta
from protocol.errors import ErrorCode, SluiceError
from protocol.messages import (
    Ack,
    Cancel,
    Classification,
    Classify,
    Delta,
    Done,
    Embed,
    Embedding,
    Error,
    Generate,
    Goaway,
    Hello,
    LabelScore,
    Limits,
    Models,
    Ping,
    Pong,
    ServerInfo,
    Timings,
    Usage,
    Welcome,
)

MAX = 1 << 20


def dec(obj: Any, max_bytes: int = MAX) -> Any:
    return decode(orjson.dumps(obj).decode(), max_bytes=max_bytes)


def refused(obj: Any, code: ErrorCode = ErrorCode.INVALID_MESSAGE) -> SluiceError:
    with pytest.raises(SluiceError) as info:
        dec(obj)
    assert info.value.code is code, info.value
    return info.value


# ---------------------------------------------------------------------------------------------
# Valid messages


@pytest.mark.parametrize(
    ("obj", "model"),
    [
        ({"type": "hello"}, Hello),
        (
            {"type": "hello", "protocol": 1, "session": "s1", "last_seq": 7, "token": "k", "client": "py/1"},
            Hello,
        ),
        ({"type": "generate", "id": "a", "prompt": "hi"}, Generate),
        ({"type": "generate", "id": "a", "messages": [{"role": "user", "content": "hi"}]}, Generate),
        (
            {
                "type": "generate",
                "id": "a",
                "model": "smollm2:135m",
                "prompt": "hi",
                "system": "be brief",
                "options": {
                    "temperature": 0.7,
                    "top_p": 0.9,
                    "top_k": 40,
                    "max_tokens": 16,
                    "stop": ["\n"],
                    "seed": 1,
                },
                "format": "json",
                "history": True,
            },
            Generate,
        ),
        ({"type": "embed", "id": "e", "input": "one"}, Embed),
        ({"type": "embed", "id": "e", "input": ["a", "b"], "normalize": False, "encoding": "base64"}, Embed),
        ({"type": "classify", "id": "c", "input": "x", "labels": ["a", "b"]}, Classify),
        (
            {"type": "classify", "id": "c", "input": ["x"], "labels": ["a", "b"], "multi_label": True},
            Classify,
        ),
        ({"type": "cancel", "id": "a"}, Cancel),
        ({"type": "ping"}, Ping),
        ({"type": "ping", "nonce": "n"}, Ping),
        ({"type": "ping", "nonce": 5}, Ping),
        ({"type": "ack", "seq": 0}, Ack),
        ({"type": "ack", "seq": 12}, Ack),
    ],
)
def test_valid_messages_decode_to_their_model(obj: dict[str, Any], model: type) -> None:
    message = dec(obj)
    assert type(message) is model
    for key, value in obj.items():
        if key == "options":
            assert message.options.model_dump(exclude_none=True) == value
        elif key == "messages":
            assert [m.model_dump(exclude_none=True) for m in message.messages] == value
        else:
            assert getattr(message, key) == value


def test_defaults() -> None:
    gen = dec({"type": "generate", "id": "a", "prompt": "p"})
    assert (gen.history, gen.format, gen.system, gen.model, gen.options.temperature) == (
        False,
        None,
        None,
        None,
        None,
    )
    emb = dec({"type": "embed", "id": "e", "input": "x"})
    assert (emb.normalize, emb.encoding, emb.texts) == (True, "float", ["x"])
    cls = dec({"type": "classify", "id": "c", "input": ["x", "y"], "labels": ["a", "b"]})
    assert (cls.multi_label, cls.texts) == (False, ["x", "y"])
    assert dec({"type": "hello"}).protocol == 1


def test_bytes_and_str_decode_alike() -> None:
    text = '{"type":"generate","id":"ü","prompt":"héllo"}'
    assert decode(text, max_bytes=MAX) == decode(text.encode(), max_bytes=MAX)


def test_unknown_fields_are_ignored_everywhere() -> None:
    message = dec(
        {
            "type": "generate",
            "id": "a",
            "prompt": "p",
            "future": {"x": 1},
            "options": {"temperature": 1, "mirostat": 2},
            "messages_v2": [],
        }
    )
    assert isinstance(message, Generate)
    assert message.options.temperature == 1.0
    assert dec({"type": "ping", "extra": True}) == Ping(type="ping")


@pytest.mark.parametrize("length", [1, 64])
def test_id_length_bounds_accepted(length: int) -> None:
    assert dec({"type": "cancel", "id": "x" * length}).id == "x" * length


@pytest.mark.parametrize("length", [0, 65])
@pytest.mark.parametrize("kind", ["generate", "embed", "classify", "cancel"])
def test_id_length_bounds_refused(kind: str, length: int) -> None:
    obj: dict[str, Any] = {
        "type": kind,
        "id": "x" * length,
        "prompt": "p",
        "input": "i",
        "labels": ["a", "b"],
    }
    error = refused(obj)
    assert "'id'" in error.message
    assert error.ref == "x" * length


# ---------------------------------------------------------------------------------------------
# Invalid fields: invalid_message naming the field


GEN = {"type": "generate", "id": "g", "prompt": "p"}
EMB = {"type": "embed", "id": "e", "input": "x"}
CLS = {"type": "classify", "id": "c", "input": "x", "labels": ["a", "b"]}


def opts(**options: Any) -> dict[str, Any]:
    return {**GEN, "options": options}


@pytest.mark.parametrize(
    ("obj", "field"),
    [
        # wrong types (strict: nothing is coerced)
        ({**GEN, "id": 5}, "id"),
        ({**GEN, "prompt": 5}, "prompt"),
        ({**GEN, "history": "yes"}, "history"),
        ({**GEN, "history": 1}, "history"),
        ({**GEN, "system": ["s"]}, "system"),
        ({**GEN, "model": ""}, "model"),
        ({**GEN, "format": "xml"}, "format"),
        ({**GEN, "options": "hot"}, "options"),
        ({"type": "generate", "id": "g", "messages": "hi"}, "messages"),
        ({"type": "generate", "id": "g", "messages": []}, "messages"),
        ({"type": "generate", "id": "g", "messages": [{"role": "bot", "content": "x"}]}, "messages[0].role"),
        ({"type": "generate", "id": "g", "messages": [{"role": "user"}]}, "messages[0].content"),
        (opts(temperature="hot"), "options.temperature"),
        (opts(top_k=True), "options.top_k"),
        (opts(top_k=1.5), "options.top_k"),
        (opts(seed="1"), "options.seed"),
        (opts(stop="\n"), "options.stop"),
        # option ranges
        (opts(temperature=-0.1), "options.temperature"),
        (opts(temperature=2.01), "options.temperature"),
        (opts(top_p=0), "options.top_p"),
        (opts(top_p=1.1), "options.top_p"),
        (opts(top_k=-1), "options.top_k"),
        (opts(top_k=1001), "options.top_k"),
        (opts(max_tokens=0), "options.max_tokens"),
        (opts(max_tokens=32769), "options.max_tokens"),
        (opts(stop=["x"] * 17), "options.stop"),
        # embed
        ({**EMB, "input": 5}, "input"),
        ({**EMB, "input": []}, "input"),
        ({**EMB, "input": ["a", 1]}, "input"),
        ({**EMB, "input": ["a"] * 2049}, "input"),
        ({**EMB, "normalize": 1}, "normalize"),
        ({**EMB, "encoding": "hex"}, "encoding"),
        ({"type": "embed", "id": "e"}, "input"),
        # classify
        ({**CLS, "labels": ["a"]}, "labels"),
        ({**CLS, "labels": []}, "labels"),
        ({**CLS, "labels": "a,b"}, "labels"),
        ({**CLS, "labels": ["a", ""]}, "labels[1]"),
        ({**CLS, "labels": [f"l{i}" for i in range(65)]}, "labels"),
        ({**CLS, "multi_label": "no"}, "multi_label"),
        ({"type": "classify", "id": "c", "input": "x"}, "labels"),
        # the rest
        ({"type": "cancel"}, "id"),
        ({"type": "cancel", "id": None}, "id"),
        ({"type": "ack"}, "seq"),
        ({"type": "ack", "seq": -1}, "seq"),
        ({"type": "ack", "seq": "3"}, "seq"),
        ({"type": "ack", "seq": 1.0}, "seq"),
        ({"type": "ping", "nonce": [1]}, "nonce"),
        ({"type": "hello", "last_seq": -1}, "last_seq"),
        ({"type": "hello", "session": ""}, "session"),
        ({"type": "hello", "protocol": "1"}, "protocol"),
        ({"type": "hello", "token": 5}, "token"),
        ({"type": "generate", "prompt": "p"}, "id"),
    ],
)
def test_invalid_field_is_named(obj: dict[str, Any], field: str) -> None:
    error = refused(obj)
    assert f"invalid field '{field}'" in error.message
    assert error.retryable is False


def test_boundary_option_values_accepted() -> None:
    for options in (
        {"temperature": 0},
        {"temperature": 2},
        {"top_p": 1},
        {"top_k": 0},
        {"top_k": 1000},
        {"max_tokens": 1},
        {"max_tokens": 32768},
        {"stop": ["x"] * 16},
        {"stop": []},
    ):
        assert isinstance(dec(opts(**options)), Generate)
    assert isinstance(dec({**CLS, "labels": [f"l{i}" for i in range(64)]}), Classify)
    assert isinstance(dec({**EMB, "input": ["a"] * 2048}), Embed)


@pytest.mark.parametrize(
    "obj",
    [
        {"type": "generate", "id": "g"},
        {"type": "generate", "id": "g", "prompt": "p", "messages": [{"role": "user", "content": "c"}]},
        {"type": "generate", "id": "g", "prompt": None, "messages": None},
    ],
)
def test_exactly_one_of_prompt_and_messages(obj: dict[str, Any]) -> None:
    error = refused(obj)
    assert "exactly one of prompt or messages" in error.message
    assert error.ref == "g"


def test_duplicate_labels_refused() -> None:
    assert "distinct" in refused({**CLS, "labels": ["a", "a"]}).message


# ---------------------------------------------------------------------------------------------
# Frame-level failures


@pytest.mark.parametrize("text", ["{", "", "nope", '{"type": "ping"', "{'type': 'ping'}", "\xff", "NaN"])
def test_bad_json(text: str) -> None:
    with pytest.raises(SluiceError) as info:
        decode(text, max_bytes=MAX)
    assert info.value.code is ErrorCode.INVALID_MESSAGE
    assert info.value.message == "message is not valid JSON"
    assert info.value.ref is None


def test_invalid_utf8_bytes_are_bad_json() -> None:
    with pytest.raises(SluiceError) as info:
        decode(b'{"type":"ping","nonce":"\xff"}', max_bytes=MAX)
    assert info.value.code is ErrorCode.INVALID_MESSAGE


@pytest.mark.parametrize("text", ["[]", '[{"type":"ping"}]', '"ping"', "1", "null", "true"])
def test_non_object_json(text: str) -> None:
    with pytest.raises(SluiceError) as info:
        decode(text, max_bytes=MAX)
    assert (info.value.code, info.value.message) == (
        ErrorCode.INVALID_MESSAGE,
        "message must be a JSON object",
    )


@pytest.mark.parametrize(
    ("obj", "detail"),
    [
        ({"id": "a"}, "missing"),
        ({"type": None, "id": "a"}, "missing"),
        ({"type": 3, "id": "a"}, "not a string"),
    ],
)
def test_missing_or_non_string_type(obj: dict[str, Any], detail: str) -> None:
    error = refused(obj)
    assert error.message == f"invalid field 'type': {detail}"
    assert error.ref == "a"


@pytest.mark.parametrize("kind", ["subscribe", "Generate", "", "welcome", "delta"])
def test_unknown_type(kind: str) -> None:
    error = refused({"type": kind, "id": "r1"}, ErrorCode.UNKNOWN_TYPE)
    assert error.ref == "r1"
    assert repr(kind) in error.message


def test_too_large_is_checked_on_raw_size_before_parsing() -> None:
    frame = '{"type":"ping","nonce":"' + "x" * 100 + '"}'
    assert isinstance(decode(frame, max_bytes=len(frame)), Ping)
    for data in (frame, frame.encode()):
        with pytest.raises(SluiceError) as info:
            decode(data, max_bytes=len(frame) - 1)
        assert info.value.code is ErrorCode.MESSAGE_TOO_LARGE
        assert info.value.retryable is False
    # Not parsed at all: even garbage is "too large", not "bad JSON".
    with pytest.raises(SluiceError) as info:
        decode("{" * 50, max_bytes=10)
    assert info.value.code is ErrorCode.MESSAGE_TOO_LARGE


def test_size_counts_utf8_bytes_not_characters() -> None:
    frame = '{"type":"ping","nonce":"' + "é" * 20 + '"}'  # 20 characters, 40 bytes
    size = len(frame.encode())
    assert isinstance(decode(frame, max_bytes=size), Ping)
    with pytest.raises(SluiceError) as info:
        decode(frame, max_bytes=size - 1)
    assert info.value.code is ErrorCode.MESSAGE_TOO_LARGE


@pytest.mark.parametrize("version", [0, 2, 99])
def test_unsupported_protocol(version: int) -> None:
    error = refused({"type": "hello", "protocol": version}, ErrorCode.UNSUPPORTED_PROTOCOL)
    assert str(version) in error.message


def test_ref_only_for_string_ids_and_never_huge() -> None:
    assert refused({"type": "nope", "id": 7}, ErrorCode.UNKNOWN_TYPE).ref is None
    assert refused({"type": "nope"}, ErrorCode.UNKNOWN_TYPE).ref is None
    long_id = "i" * 100
    assert refused({**GEN, "id": long_id}).ref == long_id
    huge = refused({**GEN, "id": "j" * 100_000}).ref
    assert huge is not None and len(huge) == 128 and huge.startswith("j" * 100)


@pytest.mark.parametrize(
    "obj",
    [
        {"type": "t" * 100_000},
        {**GEN, "prompt": ["p" * 100_000]},
        {**GEN, "format": "f" * 100_000},
        {**CLS, "labels": ["a", "b", "c" * 100_000, 5]},
    ],
)
def test_errors_never_echo_large_input(obj: dict[str, Any]) -> None:
    with pytest.raises(SluiceError) as info:
        dec(obj)
    assert len(info.value.message) < 300


# ---------------------------------------------------------------------------------------------
# encode


USAGE = Usage(prompt_tokens=3, completion_tokens=5)
TIMINGS = Timings(queue_ms=1.5, ttft_ms=None, total_ms=9.0)


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (Delta(id="a", seq=1, text="hi"), '{"type":"delta","id":"a","seq":1,"text":"hi"}'),
        (
            Delta(id='q"', seq=2, text='line\n"tab"\t\u00e9\U0001f600\x00'),
            '{"type":"delta","id":"q\\"","seq":2,"text":"line\\n\\"tab\\"\\t\u00e9\U0001f600\\u0000"}',
        ),
        (
            Done(id="a", seq=3, finish_reason="stop", usage=USAGE, timings=TIMINGS, model="m"),
            '{"type":"done","id":"a","seq":3,"finish_reason":"stop","usage":{"prompt_tokens":3,'
            '"completion_tokens":5},"timings":{"queue_ms":1.5,"ttft_ms":null,"total_ms":9.0},"model":"m"}',
        ),
        (
            Error(seq=4, ref="x", code=ErrorCode.DUPLICATE_ID, message="dup", retryable=False),
            '{"type":"error","ref":"x","seq":4,"code":"duplicate_id","message":"dup","retryable":false}',
        ),
        (
            Error(
                id="b", seq=5, code=ErrorCode.RATE_LIMITED, message="slow", retryable=True, retry_after_ms=20
            ),
            '{"type":"error","id":"b","seq":5,"code":"rate_limited","message":"slow","retryable":true,'
            '"retry_after_ms":20}',
        ),
        (Pong(), '{"type":"pong"}'),
        (Pong(nonce=7), '{"type":"pong","nonce":7}'),
        (
            Goaway(seq=6, reason="draining", retry_after_ms=500),
            '{"type":"goaway","seq":6,"reason":"draining","retry_after_ms":500}',
        ),
        (
            Embedding(id="e", seq=7, model="m", dimensions=2, embeddings=[[0.5, -1.0], [0.0, 0.25]]),
            '{"type":"embedding","id":"e","seq":7,"model":"m","dimensions":2,"embeddings":[[0.5,-1.0],[0.0,0.25]]}',
        ),
        (
            Embedding(id="e", seq=8, model="m", dimensions=1, embeddings=["AACAPw=="]),
            '{"type":"embedding","id":"e","seq":8,"model":"m","dimensions":1,"embeddings":["AACAPw=="]}',
        ),
        (
            Classification(
                id="c",
                seq=9,
                model="m",
                results=[[LabelScore(label="a", score=0.75), LabelScore(label="b", score=0.25)]],
            ),
            '{"type":"classification","id":"c","seq":9,"model":"m","results":[[{"label":"a","score":0.75},'
            '{"label":"b","score":0.25}]]}',
        ),
        (
            Welcome(
                session="s",
                resumed=True,
                last_seq=4,
                server=ServerInfo(version="0.1.0"),
                limits=Limits(
                    max_message_bytes=1024,
                    max_inflight=64,
                    replay_events=4096,
                    session_ttl_s=120,
                    max_buffered_bytes=9,
                ),
                models=Models(generate=["g"], embed=[], classify=["c"]),
            ),
            '{"type":"welcome","session":"s","resumed":true,"last_seq":4,"protocol":1,'
            '"server":{"name":"sluice","version":"0.1.0"},"limits":{"max_message_bytes":1024,"max_inflight":64,'
            '"replay_events":4096,"session_ttl_s":120,"max_buffered_bytes":9},'
            '"models":{"generate":["g"],"embed":[],"classify":["c"]}}',
        ),
    ],
)
def test_encode_is_compact_and_drops_optional_nones(message: Any, expected: str) -> None:
    assert encode(message) == expected
    # What was dropped comes back as the default: the model reads its own encoding back unchanged.
    assert type(message).model_validate_json(expected) == message


def test_delta_fast_path_round_trips_any_text() -> None:
    for text in ["", " ", "\\", "\u2028\u2029", "\ud7ff", "a" * 10_000, '"}{"']:
        message = Delta(id="x", seq=1, text=text)
        assert orjson.loads(encode(message)) == message.model_dump()


def test_encode_delta_is_fast() -> None:
    # A generous bound (measured ~0.6 µs here); only a regression to model-dump speed and worse fails.
    message = Delta(id="req-1", seq=123456, text=" token")
    rounds = 20_000
    start = time.perf_counter()
    for _ in range(rounds):
        encode(message)
    per_call = (time.perf_counter() - start) / rounds
    assert per_call < 25e-6, f"{per_call * 1e6:.1f} µs per Delta"


def test_encode_delta_from_fields_is_the_delta_encoding() -> None:
    for text in ["", " river", "\\", '"}{"', "\u2028", "é" * 300]:
        assert encode_delta("g-1", 42, text) == encode(Delta(id="g-1", seq=42, text=text))
