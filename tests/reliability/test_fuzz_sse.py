"""Fuzzing the SSE transport's way in: ``POST /v1/sessions/{id}/messages`` with fuzzed bodies.

The same generator as the WebSocket fuzzing (`tests.reliability.fuzzframes`; bodies may be any
bytes, invalid UTF-8 included) posts to one session. A body that is one message is answered as
decoding it locally predicts: a frame that does not decode gets the typed error body of its code
(``{"error": {"code", ...}}``, the status `server.api.errors.status_for` gives that code); a
request is accepted (202, its id in ``accepted``) or refused with its typed error (409
``duplicate_id``, 429 ``too_many_inflight``); anything else is 202 with nothing accepted. A body
that is an array gets 202 or a typed 4xx. Nothing is ever a 5xx. The session's events stream,
read all along, carries only valid server messages, seq gap-free, and exactly one terminal
message per accepted request; afterwards the server still serves a normal generation.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import httpx
import pytest

from protocol.codec import decode
from protocol.errors import ErrorCode, SluiceError
from protocol.messages import Classify, Embed, Generate
from server.api.errors import status_for
from tests.reliability.checks import StreamCheck
from tests.reliability.fuzzframes import KINDS, FrameFuzzer
from tests.reliability.health import MODEL, assert_server_healthy, log_offset
from tests.reliability.links import LinkClosed, SseLink, open_sse_session
from tests.reliability.serving import MAX_FRAME_BYTES, MAX_MESSAGE_BYTES
from tests.support.ollama_emulator import Emulator
from tests.support.server import ServerProcess

BODIES = 800
SSE_KINDS = tuple(kind for kind in KINDS if kind != "surrogate")  # a body is bytes: always encodable


async def read_events(link: SseLink, check: StreamCheck) -> None:
    """Every event of the stream into ``check`` (valid, gap-free, no ``internal``) until cancelled."""
    while True:
        try:
            event = await link.recv(3600)
        except LinkClosed as closed:
            raise AssertionError(f"the events stream ended: {closed}") from None
        if event["type"] != "pong":
            check.add(event)
            assert event.get("code") != ErrorCode.INTERNAL, event


async def post_bodies(
    client: httpx.AsyncClient,
    url: str,
    fuzzer: FrameFuzzer,
    accepted: Counter[str],
    statuses: Counter[int],
) -> None:
    headers = {"Content-Type": "application/json"}
    for _ in range(BODIES):
        frame = fuzzer.frame()
        body = frame.data if isinstance(frame.data, bytes) else frame.data.encode()
        response = await client.post(url, content=body, headers=headers)
        statuses[response.status_code] += 1
        where = f"{frame.kind} body {body!r:.200} → {response.status_code} {response.text[:200]}"
        assert response.status_code < 500, where
        if body.lstrip().startswith(b"["):
            if response.status_code == 202:
                accepted.update(response.json()["accepted"])
            else:
                _error_code(response)
            continue
        predicted: Any
        try:
            predicted = decode(body, max_bytes=MAX_MESSAGE_BYTES)
        except SluiceError as exc:
            predicted = exc
        if len(body) > MAX_FRAME_BYTES:
            predicted = SluiceError(ErrorCode.MESSAGE_TOO_LARGE, "body")
        match predicted:
            case SluiceError(code=code):
                assert (response.status_code, _error_code(response)) == (status_for(code), code), where
            case Generate() | Embed() | Classify() if response.status_code == 202:
                assert response.json() == {"accepted": [predicted.id], "refused": []}, where
                accepted[predicted.id] += 1
            case Generate() | Embed() | Classify():
                code = _error_code(response)
                assert code in (ErrorCode.DUPLICATE_ID, ErrorCode.TOO_MANY_INFLIGHT), where
                assert response.status_code == status_for(ErrorCode(code)), where
            case _ if predicted.type == "hello":
                assert (response.status_code, _error_code(response)) == (422, "invalid_message"), where
            case _:
                assert response.status_code == 202 and response.json()["accepted"] == [], where


def _error_code(response: httpx.Response) -> str:
    body = response.json()
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), response.text[:300]
    code = body["error"]["code"]
    ErrorCode(code)  # a known code, or ValueError
    return str(code)


async def test_fuzzed_message_bodies_get_typed_answers_and_the_session_stays_whole(
    server: ServerProcess, emu: Emulator, has_sse: bool
) -> None:
    if not has_sse:
        pytest.skip("the SSE session endpoints (POST /v1/sessions) are not served yet")
    emu.configure(tokens=8, token_rate=0.0)
    log_start = log_offset(server)
    fuzzer = FrameFuzzer(99, max_bytes=MAX_MESSAGE_BYTES, kinds=SSE_KINDS, models=(MODEL, "no-such-model"))
    accepted: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    began = time.monotonic()
    check = StreamCheck()
    async with httpx.AsyncClient(timeout=30) as client:
        session = (await open_sse_session(client, server.url))["session"]
        # The events stream is read all along, as a browser would (fuzzed acks trim the log, so
        # the events could not all be replayed afterwards).
        link = await SseLink.open(client, server.url, session, None)
        reader = asyncio.create_task(read_events(link, check))
        try:
            await post_bodies(
                client, f"{server.url}/v1/sessions/{session}/messages", fuzzer, accepted, statuses
            )
            deadline = time.monotonic() + 60
            while any(check.terminals[i] < n for i, n in accepted.items()):
                assert not reader.done(), reader
                assert time.monotonic() < deadline, "accepted requests never ended"
                await asyncio.sleep(0.05)
            # A second terminal for some id would follow soon after: read on a moment before counting.
            await asyncio.sleep(0.5)
            assert not reader.done(), reader
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            await link.close()
    assert dict(check.terminals) == dict(accepted)
    print(
        f"\n{BODIES} fuzzed bodies in {time.monotonic() - began:.1f} s: statuses {dict(sorted(statuses.items()))}; "
        f"{sum(accepted.values())} requests accepted, {check.last_seq} events streamed"
    )
    await assert_server_healthy(server, emu, log_start)
