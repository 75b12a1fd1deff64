"""Fuzzing a real server over WebSockets: thousands of fuzzed frames, each answered as the contract says.

Three connections at once send fuzzed frames (`tests.reliability.fuzzframes`: text and binary,
mutated, near-valid, garbage, deeply nested, huge numbers, oversize, invalid UTF-8 in binary),
each followed by a ``ping`` whose ``pong`` marks the end of that frame's answer. The answer is
predicted by decoding the frame locally with the same limits: a frame that does not decode gets
exactly one id-less ``error`` with the decoder's code and ``ref``; a binary frame gets
``invalid_message``; a request is accepted or refused (``duplicate_id``, ``too_many_inflight``)
with ``ref`` = its id; a ``ping`` gets its ``pong``. Every frame received is a valid server message
(closed union, known error codes), seq is gap-free, no ``internal`` error appears, every accepted
request ends with exactly one terminal message, and the connection stays open throughout.
Meanwhile another session streams normal generations whose text must stay exact.

The documented closes are checked on their own connections: a frame past ``max_frame_bytes``
closes 1009, and a text frame that is not UTF-8 closes 1007 (RFC 6455 §8.1: the WebSocket layer
fails the connection; such a frame never reaches the protocol). Afterwards a normal generate on
a fresh connection works, ``/health`` and ``/ready`` answer 200 and the server logged no traceback.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest

from protocol.codec import decode
from protocol.errors import ErrorCode, SluiceError
from protocol.messages import Classify, Embed, Generate, Hello, Ping
from tests.reliability.checks import StreamCheck
from tests.reliability.fuzzframes import KINDS, Frame, FrameFuzzer
from tests.reliability.health import MODEL, assert_server_healthy, log_offset
from tests.reliability.links import LinkClosed, WsLink
from tests.reliability.resume import expected_record
from tests.reliability.serving import MAX_FRAME_BYTES, MAX_MESSAGE_BYTES
from tests.support.ollama_emulator import Emulator
from tests.support.server import ServerProcess

WORKERS = 3
FRAMES_PER_WORKER = 1000
FRAMES_PER_CONNECTION = 100
SOCKET_KINDS = tuple(kind for kind in KINDS if kind != "surrogate")  # a str with one cannot be sent
REFUSING = (ErrorCode.DUPLICATE_ID, ErrorCode.TOO_MANY_INFLIGHT)


@dataclass
class FuzzStats:
    frames: Counter[str] = field(default_factory=Counter)
    replies: Counter[str] = field(default_factory=Counter)
    terminal_codes: Counter[str] = field(default_factory=Counter)
    connections: int = 0


class FuzzConnection:
    """One connection (one session) fed fuzzed frames, each answer checked against the prediction."""

    def __init__(self, link: WsLink, stats: FuzzStats) -> None:
        self.link = link
        self.stats = stats
        self.check = StreamCheck()
        self.accepted: Counter[str] = Counter()
        self.barriers = 0

    @classmethod
    async def open(cls, ws_url: str, first: Frame, stats: FuzzStats) -> FuzzConnection:
        """Connect with ``first`` as the very first frame (the server opens a session for it)."""
        link = await WsLink.open(ws_url, None)
        connection = cls(link, stats)
        stats.connections += 1
        await connection.send_checked(first, first_frame=True)
        assert link.welcome is not None, "no welcome before the answer to the first frame"
        return connection

    async def _barrier(self) -> list[dict[str, Any]]:
        """Every message up to the pong answering a new ping (frames are handled in order)."""
        self.barriers += 1
        nonce = f"barrier-{self.barriers}"
        await self.link.send({"type": "ping", "nonce": nonce})
        window: list[dict[str, Any]] = []
        async with asyncio.timeout(30):
            while True:
                event = await self.link.recv(30)
                if event["type"] == "pong" and event.get("nonce") == nonce:
                    return window
                if event["type"] != "pong":
                    self.check.add(event)
                    self._count(event)
                window.append(event)

    def _count(self, event: dict[str, Any]) -> None:
        self.stats.replies[event["type"]] += 1
        if event["type"] == "error":
            assert event["code"] != ErrorCode.INTERNAL, f"internal error: {event}"
            if event.get("id") is not None:
                self.stats.terminal_codes[event["code"]] += 1

    async def send_checked(self, frame: Frame, *, first_frame: bool = False) -> None:
        self.stats.frames[frame.kind] += 1
        try:
            predicted: Any = decode(frame.data, max_bytes=MAX_MESSAGE_BYTES)
        except SluiceError as exc:
            predicted = exc
        if isinstance(frame.data, bytes):
            await self.link.ws.send(frame.data)  # a binary frame
            predicted = SluiceError(ErrorCode.INVALID_MESSAGE, "binary")
        else:
            await self.link.send(frame.data)
        window = await self._barrier()
        refusals = [e for e in window if e["type"] == "error" and e.get("id") is None]
        pongs = [e for e in window if e["type"] == "pong"]
        where = f"{frame.kind} frame {frame.data!r:.200}"
        match predicted:
            case SluiceError(code=code, ref=ref):
                assert [(e["code"], e.get("ref")) for e in refusals] == [(code, ref)], (where, refusals)
            case Hello() if not first_frame:
                assert [e["code"] for e in refusals] == [ErrorCode.INVALID_MESSAGE], (where, refusals)
            case Hello():
                assert not refusals, (where, refusals)
            case Generate() | Embed() | Classify():
                assert all(e["code"] in REFUSING and e.get("ref") == predicted.id for e in refusals), (
                    where,
                    refusals,
                )
                assert len(refusals) <= 1
                if not refusals:
                    self.accepted[predicted.id] += 1
            case Ping(nonce=nonce):
                assert [e.get("nonce") for e in pongs] == [nonce], (where, pongs)
            case _:
                assert not refusals, (where, refusals)
        if not isinstance(predicted, Ping):
            assert not pongs, (where, pongs)

    async def finish(self) -> None:
        """Wait for every accepted request's terminal message, then check there was one each."""
        deadline = time.monotonic() + 30
        while any(self.check.terminals[i] < n for i, n in self.accepted.items()):
            assert time.monotonic() < deadline, f"requests never ended: {self._open()}"
            await self._barrier()
            await asyncio.sleep(0.01)
        assert dict(self.check.terminals) == dict(self.accepted), (self.check.terminals, self.accepted)
        await self.link.close()

    def _open(self) -> dict[str, int]:
        return {
            i: n - self.check.terminals[i] for i, n in self.accepted.items() if self.check.terminals[i] < n
        }


async def fuzz_worker(ws_url: str, seed: int, stats: FuzzStats) -> None:
    fuzzer = FrameFuzzer(
        seed, max_bytes=MAX_MESSAGE_BYTES, kinds=SOCKET_KINDS, models=(MODEL, "no-such-model")
    )
    sent = 0
    while sent < FRAMES_PER_WORKER:
        connection = await FuzzConnection.open(ws_url, fuzzer.frame(), stats)
        sent += 1
        for _ in range(min(FRAMES_PER_CONNECTION, FRAMES_PER_WORKER - sent)):
            frame = fuzzer.frame()
            if frame.size > MAX_FRAME_BYTES:
                continue  # those close the connection: checked on their own below
            await connection.send_checked(frame)
            sent += 1
        await connection.finish()


async def canary(ws_url: str, emu: Emulator, stop: asyncio.Event) -> list[float]:
    """Normal generations on another session while the fuzzing runs: exact text, no long wait."""
    link = await WsLink.open(ws_url, {})
    check = StreamCheck()
    durations: list[float] = []
    try:
        for n in range(400):
            if stop.is_set():
                break
            await asyncio.sleep(0.05)  # a steady trickle, not a flood competing with the fuzzing
            prompt = f"canary {n} {time.monotonic_ns()}"
            began = time.monotonic()
            await link.send({"type": "generate", "id": f"c{n}", "model": MODEL, "prompt": prompt})
            while check.terminal(f"c{n}") is None:
                event = await link.recv(10)
                check.add(event)
            durations.append(time.monotonic() - began)
            terminal = check.terminal(f"c{n}")
            assert terminal is not None and terminal["type"] == "done", terminal
            assert check.text(f"c{n}") == emu.expected_text(expected_record(emu, prompt).body)
    finally:
        await link.close()
    return durations


async def test_thousands_of_fuzzed_frames_get_typed_answers_and_the_server_goes_on(
    server: ServerProcess, emu: Emulator
) -> None:
    emu.configure(tokens=8, token_rate=0.0)
    log_start = log_offset(server)
    stats = FuzzStats()
    stop = asyncio.Event()
    began = time.monotonic()
    canary_task = asyncio.create_task(canary(server.ws_url, emu, stop))
    try:
        await asyncio.gather(*(fuzz_worker(server.ws_url, seed, stats) for seed in range(WORKERS)))
    finally:
        stop.set()
    durations = await canary_task
    elapsed = time.monotonic() - began
    total = sum(stats.frames.values())
    print(
        f"\n{total} fuzzed frames over {stats.connections} connections in {elapsed:.1f} s: {dict(stats.frames)}"
        f"\nreplies {dict(stats.replies)}; terminal error codes {dict(stats.terminal_codes)}"
        f"\ncanary: {len(durations)} generations, slowest {max(durations):.2f} s"
    )
    assert total >= WORKERS * FRAMES_PER_WORKER * 0.95
    assert set(stats.frames) == set(SOCKET_KINDS)
    assert len(durations) >= 5 and max(durations) < 5.0
    await assert_server_healthy(server, emu, log_start)


@pytest.mark.parametrize("size", [MAX_FRAME_BYTES + 1, 4 * MAX_FRAME_BYTES])
@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
async def test_a_frame_past_the_hard_limit_closes_1009_and_the_server_goes_on(
    server: ServerProcess, emu: Emulator, size: int, binary: bool
) -> None:
    link = await WsLink.open(server.ws_url, {})
    await link.send({"type": "ping", "nonce": "before"})
    assert (await link.recv(10))["type"] == "pong"
    payload = '{"type":"ping","nonce":"' + "x" * (size - 26) + '"}'
    await link.ws.send(payload.encode() if binary else payload)
    with pytest.raises(LinkClosed) as closed:
        await link.recv(10)
    assert closed.value.code == 1009
    await link.close()
    await assert_server_healthy(server, emu, None)


@pytest.mark.parametrize("bad", [b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xe6\x9d", b"\xf4\x90\x80\x80"])
async def test_a_text_frame_that_is_not_utf8_closes_1007_and_the_server_goes_on(
    server: ServerProcess, emu: Emulator, bad: bytes
) -> None:
    link = await WsLink.open(server.ws_url, {})
    await link.ws.send(b'{"type":"ping","nonce":"' + bad + b'"}', text=True)
    with pytest.raises(LinkClosed) as closed:
        await link.recv(10)
    assert closed.value.code == 1007
    await link.close()
    await assert_server_healthy(server, emu, None)
