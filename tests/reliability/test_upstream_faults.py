"""Upstream faults become the right typed error in time, while other sessions stream undisturbed.

On a server whose Ollama first-token and idle timeouts are short (`serving.FAULT_ENV`) and whose
Ollama is the emulator behind a proxy that can reset one upstream connection (`upstream_proxy`),
one session sends a generation for every fault at once — a connection reset mid-stream (killed),
half a line then a closed connection, 404, 503, 429, 500, 400, an ``error`` line mid-stream, a
malformed line, hung mid-stream, hung before the first token, hung before the headers — while
two other sessions stream normal generations. Each fault must end its request with exactly one
``error`` of the expected code (and ``retryable``/``retry_after_ms`` as the contract says),
after exactly the text upstream sent before failing, within the time its fault allows (a hang:
not before the timeout, not long after). A hung upstream must also be hung up on. The normal
streams must end ``done`` with exactly the emulator's text and no gap between deltas long
enough to be a stall; afterwards the server still serves a normal generation and logged no
traceback.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from protocol.errors import ErrorCode, is_retryable
from tests.reliability.checks import StreamCheck
from tests.reliability.health import MODEL, assert_server_healthy, log_offset
from tests.reliability.links import WsLink
from tests.reliability.resume import expected_record
from tests.reliability.serving import OLLAMA_TIMEOUT_S
from tests.reliability.upstream_proxy import UpstreamProxy
from tests.support.ollama_emulator import Emulator
from tests.support.server import ServerProcess

# The normal streams: 100 pieces/s for 3 s, longer than any fault takes to show.
PACE = {"token_rate": 100.0, "tokens": 300, "fault_after": 3, "retry_after_s": 2}
FAST_S = 3.0  # a fault the server can see at once is reported within this (generous: shared CPU)
HANG_SLACK_S = 3.0  # a hang is reported within the timeout plus this
MAX_NORMAL_GAP_S = 1.0  # pieces come every 10 ms: a gap this long would be a stall
KILL_AFTER_DELTAS = 5


@dataclass(frozen=True)
class Fault:
    name: str
    model: str
    code: ErrorCode
    pieces: int | None  # upstream pieces delivered before the error; None: some, then a kill
    hang: bool = False

    @property
    def request_id(self) -> str:
        return self.name.replace(" ", "-")


FAULTS = (
    Fault("killed mid-stream", MODEL, ErrorCode.UPSTREAM_UNAVAILABLE, None),
    Fault("closed mid-line", "fault-drop", ErrorCode.UPSTREAM_UNAVAILABLE, 3),
    Fault("not found 404", "no-such-model", ErrorCode.MODEL_NOT_FOUND, 0),
    Fault("busy 503", "fault-503", ErrorCode.OVERLOADED, 0),
    Fault("rate limited 429", "fault-429", ErrorCode.RATE_LIMITED, 0),
    Fault("failed 500", "fault-500", ErrorCode.UPSTREAM_ERROR, 0),
    Fault("rejected 400", "fault-400", ErrorCode.INVALID_REQUEST, 0),
    Fault("error line mid-stream", "fault-error-midstream", ErrorCode.UPSTREAM_ERROR, 3),
    Fault("malformed line mid-stream", "fault-malformed", ErrorCode.UPSTREAM_ERROR, 3),
    Fault("hung mid-stream", "fault-hang", ErrorCode.TIMEOUT, 3, hang=True),
    Fault("hung before the first token", "fault-hang-before-first", ErrorCode.TIMEOUT, 0, hang=True),
    Fault("hung before the headers", "fault-hang-headers", ErrorCode.TIMEOUT, 0, hang=True),
)


@dataclass
class Observed:
    sent: dict[str, float] = field(default_factory=dict)
    ended: dict[str, float] = field(default_factory=dict)
    delta_times: dict[str, list[float]] = field(default_factory=dict)


async def read_until_ended(
    link: WsLink,
    check: StreamCheck,
    ids: set[str],
    observed: Observed,
    *,
    within: float,
    on_delta: Any = None,
) -> None:
    async with asyncio.timeout(within):
        while any(check.terminal(i) is None for i in ids):
            event = await link.recv(within)
            now = time.monotonic()
            if event["type"] == "pong":
                continue
            check.add(event)
            request_id = event.get("id")
            if event["type"] == "delta":
                assert isinstance(request_id, str)
                observed.delta_times.setdefault(request_id, []).append(now)
                if on_delta is not None:
                    await on_delta(request_id, len(observed.delta_times[request_id]))
            elif request_id is not None:
                observed.ended[request_id] = now


async def normal_stream(ws_url: str, emu: Emulator, name: str, started: asyncio.Event) -> list[str]:
    """One normal generation on its own session; the problems found (none expected)."""
    link = await WsLink.open(ws_url, {})
    check = StreamCheck()
    observed = Observed()
    prompt = f"normal {name} {time.monotonic_ns()}"

    async def first_delta(_: str, count: int) -> None:
        if count == 1:
            started.set()

    try:
        await link.send({"type": "generate", "id": name, "model": MODEL, "prompt": prompt})
        await read_until_ended(link, check, {name}, observed, within=30, on_delta=first_delta)
    finally:
        await link.close()
    problems = []
    terminal = check.terminal(name)
    if terminal is None or terminal["type"] != "done" or terminal["finish_reason"] != "stop":
        problems.append(f"{name}: ended with {terminal}")
    if check.text(name) != emu.expected_text(expected_record(emu, prompt).body):
        problems.append(f"{name}: text differs from upstream")
    times = observed.delta_times.get(name, [])
    gaps = [b - a for a, b in itertools.pairwise(times)]
    if gaps and max(gaps) > MAX_NORMAL_GAP_S:
        problems.append(f"{name}: stalled {max(gaps):.2f} s between deltas")
    return problems


def fault_problems(
    fault: Fault, check: StreamCheck, observed: Observed, emu: Emulator, prompt: str
) -> list[str]:
    request_id = fault.request_id
    terminal = check.terminal(request_id)
    if terminal is None or terminal["type"] != "error":
        return [f"{fault.name}: ended with {terminal}, not an error"]
    problems = []
    if terminal["code"] != fault.code:
        problems.append(f"{fault.name}: {terminal['code']} ({terminal['message']}), expected {fault.code}")
    if terminal["retryable"] != is_retryable(ErrorCode(terminal["code"])):
        problems.append(f"{fault.name}: retryable {terminal['retryable']} for {terminal['code']}")
    if (
        fault.code in (ErrorCode.OVERLOADED, ErrorCode.RATE_LIMITED)
        and terminal.get("retry_after_ms") != 2000
    ):
        problems.append(f"{fault.name}: retry_after_ms {terminal.get('retry_after_ms')}, upstream said 2 s")
    if len(terminal["message"]) > 300 or "Traceback" in terminal["message"]:
        problems.append(f"{fault.name}: message {terminal['message']!r}")
    took = observed.ended[request_id] - observed.sent[request_id]
    if fault.hang:
        low, high = 0.9 * OLLAMA_TIMEOUT_S, OLLAMA_TIMEOUT_S + HANG_SLACK_S
        if not low <= took <= high:
            problems.append(f"{fault.name}: reported after {took:.2f} s, expected {low:.2f}..{high:.2f} s")
    elif took > FAST_S:
        problems.append(f"{fault.name}: reported after {took:.2f} s, expected within {FAST_S} s")
    text = check.text(request_id)
    records = [r for r in emu.generations() if r.model == fault.model and prompt in str(r.body)]
    if fault.pieces is None:
        full = emu.expected_text(expected_record(emu, prompt).body)
        if not (text and full.startswith(text) and len(text) < len(full)):
            problems.append(f"{fault.name}: text {text!r:.80} is not a cut of the upstream text")
    elif fault.model == "no-such-model" or fault.pieces == 0:
        if text:
            problems.append(f"{fault.name}: text {text!r:.80} before the error")
    elif len(records) != 1 or text != "".join(records[0].planned[: fault.pieces]):
        problems.append(f"{fault.name}: text {text!r:.80} is not the {fault.pieces} pieces upstream sent")
    if fault.hang and records and not emu.wait(lambda: records[0].client_closed_early, 5):
        problems.append(f"{fault.name}: the hung upstream request was never hung up on")
    return problems


async def test_each_upstream_fault_is_typed_in_time_while_other_sessions_stream_on(
    fault_server: ServerProcess, emu: Emulator, proxy: UpstreamProxy
) -> None:
    emu.configure(**PACE)
    log_start = log_offset(fault_server)
    started = [asyncio.Event(), asyncio.Event()]
    normals = [
        asyncio.create_task(normal_stream(fault_server.ws_url, emu, f"normal-{n}", started[n]))
        for n in range(2)
    ]
    for event in started:
        await asyncio.wait_for(event.wait(), 10)

    link = await WsLink.open(fault_server.ws_url, {})
    check = StreamCheck()
    observed = Observed()
    tag = time.monotonic_ns()
    prompts = {fault.request_id: f"{fault.name} {tag}" for fault in FAULTS}
    killed = FAULTS[0]

    async def kill_when_streaming(request_id: str, count: int) -> None:
        if request_id == killed.request_id and count == KILL_AFTER_DELTAS:
            assert await asyncio.to_thread(proxy.kill, prompts[request_id].encode()) == 1

    try:
        for fault in FAULTS:
            message = {"type": "generate", "id": fault.request_id, "model": fault.model}
            observed.sent[fault.request_id] = time.monotonic()
            await link.send(message | {"prompt": prompts[fault.request_id]})
        ids = {fault.request_id for fault in FAULTS}
        await read_until_ended(link, check, ids, observed, within=30, on_delta=kill_when_streaming)
    finally:
        await link.close()
    problems = [p for f in FAULTS for p in fault_problems(f, check, observed, emu, prompts[f.request_id])]
    for normal in normals:
        problems += await normal
    summary = ", ".join(
        f"{f.name} {observed.ended[f.request_id] - observed.sent[f.request_id]:.2f} s" for f in FAULTS
    )
    print(f"\nfaults reported after: {summary}")
    assert not problems, "\n".join(problems)
    await assert_server_healthy(fault_server, emu, log_start)
