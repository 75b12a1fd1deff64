"""The resume soak: one session streams generations while its client is cut off again and again.

`run_soak` keeps a few generations in flight on one session (upstream: the Ollama emulator, whose
text is deterministic) and, after reading a random number of events (none at all: the cut lands
inside the replay), resets the TCP connection (`links.reset`) and resumes — ``hello {session,
last_seq}`` on a new WebSocket, ``Last-Event-ID`` (or ``?last_event_id=``) on a new SSE stream, or
either at random (``mixed``: the session moves between transports). Sometimes it waits a moment
before reconnecting, so the server runs on detached and merges what it logs.

What it asserts, throughout: every resume finds the session (``resumed: true``, never a new one);
seq goes up by exactly one across all connections (`checks.StreamCheck`: no event lost or read
twice); each generation ends with exactly one ``done`` (``finish_reason: stop``) and its deltas
concatenate to exactly the text the emulator sent for it (no token lost or duplicated, whatever
the merging); nothing stalls longer than ``stall_s``. It stops by itself after ``disconnects`` cuts
(or ``time_limit_s``), then reads the generations still in flight to their end.

Given ``nodes`` (several cluster nodes sharing one Redis), each resume goes to one of them at
random, so the session moves between nodes as well; the checks are the same. Used by
``tests/reliability/test_resume_soak.py`` (bounded) and ``bench/soak.py`` (the full 1,000, on one
node or two). Talks to 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from tests.reliability.checks import StreamCheck
from tests.reliability.links import Link, SseLink, WsLink, open_sse_session
from tests.support.ollama_emulator import Emulator, RequestRecord

__all__ = ["SoakConfig", "SoakResult", "expected_record", "run_soak"]

Transport = Literal["ws", "sse", "mixed"]


@dataclass(frozen=True)
class SoakConfig:
    transport: Transport
    disconnects: int
    seed: int = 0
    concurrent: int = 2  # generations in flight at once
    max_read: int = 60  # events read between two cuts, at most
    pause_chance: float = 0.2  # how often to stay away a moment before resuming
    max_pause_s: float = 0.03
    long_pause_chance: float = 0.03  # ... and now and then long enough for a large merged replay
    long_pause_s: float = 0.3
    model: str = "llama3.2:1b"
    stall_s: float = 10.0  # no event for this long while a generation runs = a failure
    time_limit_s: float = 120.0


@dataclass
class SoakResult:
    config: SoakConfig
    disconnects: int = 0
    resumes: dict[str, int] = field(default_factory=lambda: {"ws": 0, "sse": 0})
    node_resumes: dict[str, int] = field(default_factory=dict)  # per base URL, with several nodes
    cuts_in_replay: int = 0  # cuts made before reading anything after a resume
    generations: int = 0
    pieces: int = 0  # upstream tokens (emulator pieces) of the finished generations
    chars: int = 0
    events: int = 0
    deltas: int = 0
    replayed: int = 0  # events that reached the client from the log after a resume
    reconnect_ms: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0
    stopped_early: bool = False

    def summary(self) -> str:
        ms = sorted(self.reconnect_ms) or [0.0]
        p99 = ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]
        return (
            f"{self.config.transport}: {self.disconnects} forced disconnects "
            f"(resumed ws {self.resumes['ws']}, sse {self.resumes['sse']}; {self.cuts_in_replay} cut "
            f"before reading a single event), {self.generations} generations, {self.pieces} tokens, "
            f"{self.chars} chars, {self.events} events ({self.deltas} deltas, {self.replayed} replayed after a ws resume), "
            f"0 lost, 0 duplicated; reconnect p50 {statistics.median(ms):.1f} ms, p99 {p99:.1f} ms; "
            f"{self.elapsed_s:.1f} s" + (" (stopped early: time limit)" if self.stopped_early else "")
        ) + self._nodes_summary()

    def _nodes_summary(self) -> str:
        if not self.node_resumes:
            return ""
        moved = ", ".join(f"{url} {count}" for url, count in sorted(self.node_resumes.items()))
        return f"; resumes per node: {moved}"


def expected_record(emu: Emulator, prompt: str) -> RequestRecord:
    """The one upstream request that carried ``prompt``."""
    found = [r for r in emu.generations() if _carries(r.body, prompt)]
    assert len(found) == 1, f"{len(found)} upstream requests carried {prompt!r}"
    return found[0]


def _carries(body: Any, prompt: str) -> bool:
    if not isinstance(body, dict):
        return False
    if body.get("prompt") == prompt:
        return True
    messages = body.get("messages")
    return isinstance(messages, list) and any(
        isinstance(m, dict) and m.get("content") == prompt for m in messages
    )


@dataclass
class _Generation:
    id: str
    prompt: str
    started: float


class _Soak:
    def __init__(
        self,
        config: SoakConfig,
        *,
        base_url: str,
        emulator: Emulator,
        client: httpx.AsyncClient,
        nodes: Sequence[str] = (),
    ) -> None:
        self.config = config
        self.base_url = base_url
        self.ws_url = _ws_url(base_url)
        self.nodes = list(nodes)  # several: each resume picks one of them at random
        self.emu = emulator
        self.client = client
        self.rng = random.Random(config.seed)
        self.check = StreamCheck()
        self.result = SoakResult(config)
        self.open: dict[str, _Generation] = {}
        self.session = ""
        self.started = 0
        self.tag = f"soak-{config.transport}-{config.seed}-{time.monotonic_ns()}"
        self.replay_upto = 0  # events up to this seq, read after a resume, came from the log

    # -- connections -------------------------------------------------------------------------

    def _pick_transport(self) -> Literal["ws", "sse"]:
        transport = self.config.transport
        if transport == "mixed":
            return "ws" if self.rng.random() < 0.5 else "sse"
        return transport

    def _pick_node(self) -> None:
        """Point the next connection (and the POSTs on it) at a random node of several."""
        self.base_url = self.rng.choice(self.nodes)
        self.ws_url = _ws_url(self.base_url)
        self.result.node_resumes[self.base_url] = self.result.node_resumes.get(self.base_url, 0) + 1

    async def _connect(self, *, first: bool) -> Link:
        kind = self._pick_transport()
        if len(self.nodes) > 1 and not first:
            self._pick_node()
        began = time.perf_counter()
        link: Link
        if kind == "ws":
            hello = {} if first else {"session": self.session, "last_seq": self.check.last_seq}
            link = await WsLink.open(self.ws_url, hello)
            welcome = link.welcome
            assert welcome is not None
            if first:
                self.session = welcome["session"]
            else:
                assert welcome["resumed"] is True and welcome["session"] == self.session, (
                    f"resume after seq {self.check.last_seq} got a new session: {welcome}"
                )
                assert welcome["last_seq"] >= self.check.last_seq
                self.replay_upto = welcome["last_seq"]
        else:
            if first:
                welcome = await open_sse_session(self.client, self.base_url)
                self.session = welcome["session"]
            link = await SseLink.open(
                self.client,
                self.base_url,
                self.session,
                None if first else self.check.last_seq,
                via_query=self.rng.random() < 0.3,
            )
        if not first:
            self.result.reconnect_ms.append((time.perf_counter() - began) * 1000)
            self.result.resumes[kind] += 1
        return link

    # -- generations -------------------------------------------------------------------------

    async def _start_generation(self, link: Link) -> None:
        self.started += 1
        request_id = f"g{self.started}"
        prompt = f"{self.tag}-{self.started}"
        message = {"type": "generate", "id": request_id, "model": self.config.model, "prompt": prompt}
        self.open[request_id] = _Generation(request_id, prompt, time.monotonic())
        if isinstance(link, SseLink):
            await link.send(message)  # 202 means it was handled: it cannot be lost by a cut
            return
        # Over a WebSocket a frame written just before a cut may never arrive; a ping behind it
        # answered proves it did (frames are handled in order), so the cut cannot lose it.
        nonce = f"sent-{request_id}"
        await link.send(message)
        await link.send({"type": "ping", "nonce": nonce})
        while True:
            event = await link.recv(self.config.stall_s)
            if event["type"] == "pong":
                if event.get("nonce") == nonce:
                    return
                continue
            self._handle(event)

    def _handle(self, event: dict[str, Any]) -> None:
        if event["type"] == "pong":
            return
        self.check.add(event)
        result = self.result
        result.events += 1
        if event["seq"] <= self.replay_upto:
            result.replayed += 1
        request_id = event.get("id")
        assert request_id in self.open, f"event for a request not in flight: {event}"
        match event["type"]:
            case "delta":
                result.deltas += 1
            case "done":
                self._finished(self.open.pop(request_id), event)
            case _:
                raise AssertionError(f"unexpected event in the soak: {event}")

    def _finished(self, generation: _Generation, done: dict[str, Any]) -> None:
        assert done["finish_reason"] == "stop", done
        record = expected_record(self.emu, generation.prompt)
        expected = self.emu.expected_text(record.body)
        text = self.check.text(generation.id)
        assert record.pieces_sent == len(record.planned) and record.outcome == "completed", record
        if text != expected:
            lost = len(expected) - len(text)
            raise AssertionError(
                f"{generation.id}: text differs from upstream ({len(text)} chars vs {len(expected)}, "
                f"{lost:+d}); first difference at {_first_difference(text, expected)}"
            )
        self.check.terminal(generation.id)  # exactly one terminal for this id
        self.result.generations += 1
        self.result.pieces += len(record.planned)
        self.result.chars += len(text)

    # -- the loop ----------------------------------------------------------------------------

    def _read_budget(self) -> int:
        roll = self.rng.random()
        if roll < 0.15:
            return 0
        if roll < 0.5:
            return self.rng.randint(1, 10)
        return self.rng.randint(10, self.config.max_read)

    async def run(self) -> SoakResult:
        config, result = self.config, self.result
        began = time.monotonic()
        link = await self._connect(first=True)
        try:
            while True:
                cutting = result.disconnects < config.disconnects
                if cutting and time.monotonic() - began > config.time_limit_s:
                    result.stopped_early = True
                    cutting = False
                if cutting:
                    while len(self.open) < config.concurrent:
                        await self._start_generation(link)
                elif not self.open:
                    break
                budget = self._read_budget() if cutting else 1 << 30
                if cutting and budget == 0:
                    result.cuts_in_replay += 1
                read = 0
                while read < budget and self.open:
                    self._handle_or_pong(await link.recv(config.stall_s))
                    read += 1
                    if cutting and len(self.open) < config.concurrent:
                        await self._start_generation(link)
                if not cutting:
                    continue
                link.kill()
                result.disconnects += 1
                roll = self.rng.random()
                if roll < config.long_pause_chance:
                    await asyncio.sleep(config.long_pause_s)
                elif roll < config.pause_chance:
                    await asyncio.sleep(self.rng.uniform(0, config.max_pause_s))
                link = await self._connect(first=False)
        finally:
            await link.close()
        assert not self.open
        assert self.check.last_seq == result.events
        result.elapsed_s = time.monotonic() - began
        return result

    def _handle_or_pong(self, event: dict[str, Any]) -> None:
        if event["type"] != "pong":
            self._handle(event)


def _ws_url(base_url: str) -> str:
    return base_url.replace("http://", "ws://", 1) + "/v1/ws"


def _first_difference(a: str, b: str) -> str:
    for index, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return f"char {index}: {a[index : index + 12]!r} vs {b[index : index + 12]!r}"
    return f"char {min(len(a), len(b))} (one is a prefix of the other)"


async def run_soak(
    config: SoakConfig, *, base_url: str, emulator: Emulator, nodes: Sequence[str] = ()
) -> SoakResult:
    """Run one soak against the server at ``base_url`` whose Ollama is ``emulator``; with
    ``nodes`` (base URLs of cluster nodes, ``base_url`` among them) each resume goes to a random
    one of them."""
    limits = httpx.Limits(max_connections=8, max_keepalive_connections=8)
    async with httpx.AsyncClient(timeout=10.0, limits=limits) as client:
        soak = _Soak(config, base_url=base_url, emulator=emulator, client=client, nodes=nodes)
        try:
            return await soak.run()
        except Exception as error:
            error.add_note(f"{config.transport} soak: after {soak.result.disconnects} forced disconnects")
            raise
