"""The SSE session transport on a real server: PROTOCOL.md §3 from the outside."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import httpx
import pytest

from protocol.messages import Delta
from server.transports.sse import _delta_frame, _frame
from tests.api.conftest import MODEL
from tests.support.ollama_emulator import Emulator
from tests.transports.sse.session_helpers import EventStream, open_session, post

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def client(base_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=base_url, timeout=30.0) as http:
        yield http


def _seqs_complete(events: list[dict[str, object]]) -> bool:
    return [event["seq"] for event in events] == list(range(1, len(events) + 1))


async def test_generate_embed_classify_concurrently_on_one_stream(
    client: httpx.AsyncClient, emulator: Emulator, paced: Callable[..., None]
) -> None:
    paced(token_rate=60.0)
    welcome = await open_session(client, client="test")
    assert welcome["resumed"] is False and welcome["last_seq"] == 0
    assert "all-MiniLM-L6-v2" in welcome["models"]["embed"]
    session = welcome["session"]
    async with EventStream(client, session) as stream:
        assert await stream.opened() == 200
        prompt = "concurrent sse generation"
        response = await post(
            client,
            session,
            [
                {"type": "generate", "id": "g", "model": MODEL, "prompt": prompt},
                {"type": "embed", "id": "e", "input": ["a river", "a heron"]},
                {"type": "classify", "id": "c", "input": "the dog barked", "labels": ["animals", "finance"]},
            ],
        )
        assert response.status_code == 202, response.text
        assert response.json() == {"accepted": ["g", "e", "c"], "refused": []}
        await stream.until(lambda: all(stream.terminal(i) for i in "gec"))
    embedding, classification, done = stream.terminal("e"), stream.terminal("c"), stream.terminal("g")
    assert embedding is not None and embedding["type"] == "embedding"
    assert embedding["dimensions"] == 384 and len(embedding["embeddings"]) == 2
    assert classification is not None and classification["type"] == "classification"
    assert classification["results"][0][0]["label"] == "animals"
    assert done is not None and done["type"] == "done" and done["finish_reason"] == "stop"
    assert stream.text("g") == emulator.expected_text({"prompt": prompt})
    assert _seqs_complete(stream.events)
    # The embed and classify answers arrived while the generation (3 s long) was still streaming.
    for answer in (embedding, classification):
        assert stream.events.index(answer) < stream.events.index(done)


async def _open_sse_streams(client: httpx.AsyncClient) -> float:
    for line in (await client.get("/metrics")).text.splitlines():
        if line.startswith('sluice_connections_open{transport="sse"}'):
            return float(line.rpartition(" ")[2])
    return 0.0


async def test_stream_headers_retry_keepalive_and_prompt_detach(client: httpx.AsyncClient) -> None:
    session = (await open_session(client))["session"]
    before = await _open_sse_streams(client)
    async with EventStream(client, session) as stream:
        assert await stream.opened() == 200
        await stream.until(lambda: any(item.kind == "comment" for item in stream.items), within=5.0)
        assert await _open_sse_streams(client) == before + 1
    # The client went away: the server notices at once, without waiting for a write to fail.
    for _ in range(40):
        if await _open_sse_streams(client) == before:
            break
        await asyncio.sleep(0.05)
    assert await _open_sse_streams(client) == before
    assert stream.headers is not None
    assert stream.headers["content-type"].startswith("text/event-stream")
    assert stream.headers["cache-control"] == "no-cache"
    assert stream.headers["x-accel-buffering"] == "no"
    assert stream.items[0].kind == "retry" and stream.items[0].data == "250"


@pytest.mark.parametrize("query", [False, True], ids=["last-event-id-header", "last_event_id-query"])
async def test_stream_killed_mid_generation_resumes_with_the_exact_text(
    client: httpx.AsyncClient, emulator: Emulator, paced: Callable[..., None], query: bool
) -> None:
    paced(token_rate=150.0)
    session = (await open_session(client))["session"]
    prompt = f"resume me ({query})"
    seen: list[dict[str, object]] = []
    stream = EventStream(client, session)
    await stream.opened()
    assert (
        await post(client, session, {"type": "generate", "id": "long", "model": MODEL, "prompt": prompt})
    ).status_code == 202
    for cut in range(4):
        await stream.until(
            lambda s=stream: (
                s.terminal("long") is not None or sum(e["type"] == "delta" for e in s.events) >= 5
            )
        )
        await stream.close()  # the connection drops mid-generation
        seen.extend(stream.events)
        if stream.terminal("long"):
            break
        await asyncio.sleep(0.1 * cut)
        stream = EventStream(client, session, last_event_id=int(str(seen[-1]["seq"])), query=query)
        assert await stream.opened() == 200
    await stream.until(lambda: stream.terminal("long") is not None)
    await stream.close()
    seen.extend(stream.events)
    assert _seqs_complete(seen), [e["seq"] for e in seen]
    text = "".join(str(e["text"]) for e in seen if e["type"] == "delta")
    assert text == emulator.expected_text({"prompt": prompt})
    assert seen[-1]["type"] == "done"


async def test_resume_after_the_events_are_gone_is_refused_whole(client: httpx.AsyncClient) -> None:
    session = (await open_session(client))["session"]
    body = [
        {"type": "generate", "id": f"g{n}", "model": MODEL, "prompt": "short", "options": {"max_tokens": 3}}
        for n in range(3)
    ]
    async with EventStream(client, session) as stream:
        assert (await post(client, session, body)).status_code == 202
        await stream.until(lambda: all(stream.terminal(f"g{n}") for n in range(3)))
    last = stream.last_seq
    # The client acknowledges everything: the log may drop it, so a resume from before is partial.
    assert (await post(client, session, {"type": "ack", "seq": last})).json() == {
        "accepted": [],
        "refused": [],
    }
    async with EventStream(client, session, last_event_id=last - 2) as gone:
        assert await gone.opened() == 410
    async with EventStream(client, session, last_event_id=last) as fine:
        assert await fine.opened() == 200
    # POST /v1/sessions with the same point answers with a new session, never a partial one.
    welcome = await open_session(client, session=session, last_seq=last - 2)
    assert welcome["resumed"] is False and welcome["session"] != session
    resumed = await open_session(client, session=session, last_seq=last)
    assert resumed["resumed"] is True and resumed["session"] == session and resumed["last_seq"] == last


async def test_unknown_session_and_delete(
    client: httpx.AsyncClient, emulator: Emulator, paced: Callable[..., None]
) -> None:
    async with EventStream(client, "s_nope") as unknown:
        assert await unknown.opened() == 404
    assert (await post(client, "s_nope", {"type": "ping"})).status_code == 404
    paced(token_rate=50.0)
    session = (await open_session(client))["session"]
    prompt = "delete me while I stream"
    async with EventStream(client, session) as stream:
        await post(client, session, {"type": "generate", "id": "g", "model": MODEL, "prompt": prompt})
        await stream.until(lambda: len(stream.events) >= 2)
        response = await client.delete(f"/v1/sessions/{session}")
        assert response.status_code == 204
        await asyncio.wait_for(stream.ended.wait(), 5.0)
    assert stream.closed_with is not None and stream.closed_with["code"] == 1001
    # Ending the session cancelled the upstream generation.
    assert await emulator.until(
        lambda: any(r.client_closed_early for r in emulator.generations() if r.body.get("prompt") == prompt),
        5.0,
    )
    assert (await client.delete(f"/v1/sessions/{session}")).status_code == 404


async def test_a_second_stream_takes_over(client: httpx.AsyncClient) -> None:
    session = (await open_session(client))["session"]
    first = EventStream(client, session)
    assert await first.opened() == 200
    async with EventStream(client, session) as second:
        assert await second.opened() == 200
        await asyncio.wait_for(first.ended.wait(), 5.0)
        assert first.closed_with == {"code": 4009, "reason": "session taken over by another connection"}
        await post(client, session, {"type": "ping", "nonce": 7})
        await second.until(lambda: any(i.event == "pong" for i in second.items))
    pong = next(i for i in second.items if i.event == "pong")
    assert pong.json() == {"type": "pong", "nonce": 7} and pong.id is None
    await first.close()


async def test_posted_messages_are_refused_like_frames(client: httpx.AsyncClient) -> None:
    session = (await open_session(client))["session"]
    path = f"/v1/sessions/{session}/messages"
    bad_json = await client.post(path, content=b"{nope", headers={"content-type": "application/json"})
    assert bad_json.status_code == 422 and bad_json.json()["error"]["code"] == "invalid_message"
    unknown = await post(client, session, {"type": "launch", "id": "x"})
    assert unknown.status_code == 422 and unknown.json()["error"] == {
        "code": "unknown_type",
        "message": "unknown message type 'launch'",
        "retryable": False,
        "ref": "x",
    }
    field = await post(client, session, [{"type": "ping"}, {"type": "embed", "id": "e", "input": 5}])
    assert field.status_code == 422
    assert field.json()["error"]["message"].startswith("message [1]: invalid field 'input'")
    too_large = await client.post(path, content=b'{"type":"ping","pad":"' + b"x" * 1_100_000 + b'"}')
    assert too_large.status_code == 413 and too_large.json()["error"]["code"] == "message_too_large"
    generate = {"type": "generate", "id": "d", "model": MODEL, "prompt": "x"}
    async with EventStream(client, session) as stream:
        # An array is handled message by message: the duplicate is refused, the rest accepted.
        mixed = await post(client, session, [generate, generate, {"type": "embed", "id": "e2", "input": "y"}])
        assert mixed.status_code == 202
        assert mixed.json()["accepted"] == ["d", "e2"]
        (refusal,) = mixed.json()["refused"]
        assert refusal["code"] == "duplicate_id" and refusal["ref"] == "d"
        await stream.until(lambda: any(e["type"] == "error" and e.get("ref") == "d" for e in stream.events))
        await stream.until(lambda: stream.terminal("d") is not None and stream.terminal("e2") is not None)
    error = next(e for e in stream.events if e["type"] == "error" and e.get("ref") == "d")
    assert error["seq"] == refusal["seq"] and "id" not in error


async def test_single_refused_message_gets_its_status(
    client: httpx.AsyncClient, paced: Callable[..., None]
) -> None:
    paced(token_rate=20.0)
    session = (await open_session(client))["session"]
    generate = {"type": "generate", "id": "same", "model": MODEL, "prompt": "slow"}
    assert (await post(client, session, generate)).status_code == 202
    duplicate = await post(client, session, generate)
    assert duplicate.status_code == 409
    body = duplicate.json()["error"]
    assert body["code"] == "duplicate_id" and body["ref"] == "same" and body["seq"] >= 1
    assert (await client.delete(f"/v1/sessions/{session}")).status_code == 204


async def test_foreign_origin_is_forbidden(client: httpx.AsyncClient) -> None:
    foreign = {"Origin": "https://evil.example"}
    assert (await client.post("/v1/sessions", json={}, headers=foreign)).status_code == 403
    session = (await open_session(client))["session"]
    async with EventStream(client, session, headers=foreign) as stream:
        assert await stream.opened() == 403
    local = await client.post("/v1/sessions", json={}, headers={"Origin": "http://localhost:3000"})
    assert local.status_code == 201
    # `curl -d '{}'` says form-encoded: the body is still read as the JSON it is.
    form = await client.post(
        "/v1/sessions",
        content=b'{"client": "curl"}',
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert form.status_code == 201


async def test_open_session_body_is_validated(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/sessions", json={"last_seq": -1})
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "last_seq"
    wrong = await client.post("/v1/sessions", json={"protocol": 2})
    assert wrong.status_code == 400 and wrong.json()["error"]["code"] == "unsupported_protocol"
    async with EventStream(client, "s_x", headers={"Last-Event-ID": "abc"}) as stream:
        assert await stream.opened() == 422


def test_a_delta_framed_from_its_fields_is_the_delta_event() -> None:
    for text in ["", " river", "two\nlines", "é\r\n"]:
        assert _delta_frame("g-1", 7, text) == _frame(Delta(id="g-1", seq=7, text=text))
