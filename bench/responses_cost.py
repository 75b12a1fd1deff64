"""Server CPU per token of an OpenAI Responses stream (SSE, and the WebSocket mode) against a
chat.completions stream.

One emulator (paced: one piece per write, so no two tokens reach sluice merged) and one sluice;
rounds of ``streams`` concurrent streams alternate between ``POST /v1/chat/completions`` and
``POST /v1/responses`` (both ``stream: true``) and ``GET /v1/responses`` as a WebSocket (one
socket per round, one lane per stream), so that every API sees the same machine state. Per
round: the server's own CPU seconds (psutil, process tree) over the round, divided by the text
deltas the client received. The figures are the ratios of the medians (Responses / chat, WebSocket / chat). The load
generator is `bench.rawhttp` in this process. It talks to 127.0.0.1 only and stops by itself.

Run: `python -m bench.responses_cost [--quick]` prints its JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import sys
from typing import Any

import orjson
from websockets.asyncio.client import connect

from bench import servers
from bench.procs import Proc
from bench.rawhttp import HttpConnection, iter_sse


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


async def _stream(port: int, api: str, model: str, tokens: int, k: int) -> int:
    """One stream; the count of text deltas received (checked against the end event)."""
    connection = HttpConnection(port)
    prompt = f"stream {k}: tell me about the river"
    if api == "chat":
        path = "/v1/chat/completions"
        body: dict[str, Any] = {"model": model, "stream": True, "max_tokens": tokens}
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        path = "/v1/responses"
        body = {"model": model, "stream": True, "max_output_tokens": tokens, "input": prompt, "store": False}
    deltas, ended = 0, False
    try:
        async for _, event in iter_sse(connection.stream("POST", path, json=body)):
            data = event["data"]
            if data == "[DONE]":
                ended = True
                continue
            parsed = orjson.loads(data)
            if api == "chat":
                choices = parsed.get("choices") or []
                deltas += sum(1 for choice in choices if choice["delta"].get("content"))
            elif parsed["type"] == "response.output_text.delta":
                deltas += 1
            elif parsed["type"] in ("response.completed", "response.incomplete"):
                ended = True
    finally:
        await connection.close()
    if not ended:
        raise RuntimeError(f"{api} stream {k} ended without its final event")
    return deltas


async def _socket(port: int, model: str, tokens: int, streams: int) -> int:
    """``streams`` responses over one Responses WebSocket, one lane each; the text deltas received."""
    deltas, open_lanes = 0, set()
    async with connect(f"ws://127.0.0.1:{port}/v1/responses", max_size=None, compression=None) as socket:
        for k in range(streams):
            create = {"type": "response.create", "model": model, "max_output_tokens": tokens, "store": False}
            prompt = f"stream {k}: tell me about the river"
            await socket.send(orjson.dumps({**create, "input": prompt, "stream_id": f"s{k}"}).decode())
            open_lanes.add(f"s{k}")
        while open_lanes:
            event = orjson.loads(await socket.recv(decode=False))
            if event["type"] == "response.output_text.delta":
                deltas += 1
            elif event["type"] in ("response.completed", "response.incomplete"):
                open_lanes.discard(event["stream_id"])
            elif event["type"] in ("response.failed", "error"):
                raise RuntimeError(f"a WebSocket response failed: {event}")
    return deltas


async def _round(proc: Proc, port: int, api: str, model: str, streams: int, tokens: int) -> dict[str, float]:
    before = proc.cpu_seconds()
    if api == "responses_ws":
        counts = [await _socket(port, model, tokens, streams)]
    else:
        counts = await asyncio.gather(*(_stream(port, api, model, tokens, k) for k in range(streams)))
    cpu = proc.cpu_seconds() - before
    received = sum(counts)
    return {"cpu_s": cpu, "deltas": received, "cpu_ms_per_1k": 1e6 * cpu / max(received, 1)}


async def _run(port: int, proc: Proc, model: str, args: argparse.Namespace) -> dict[str, Any]:
    apis = ("chat", "responses", "responses_ws")
    rounds: dict[str, list[dict[str, float]]] = {api: [] for api in apis}
    for api in apis:  # warm every path before measuring
        await _round(proc, port, api, model, 2, 5)
    for _ in range(args.rounds):
        for api in apis:
            rounds[api].append(await _round(proc, port, api, model, args.streams, args.tokens))
    medians = {api: statistics.median(r["cpu_ms_per_1k"] for r in runs) for api, runs in rounds.items()}
    return {
        "cpu_model": _cpu_model(),
        "streams": args.streams,
        "tokens": args.tokens,
        "token_rate": args.token_rate,
        "rounds": rounds,
        "median_cpu_ms_per_1k_tokens": medians,
        "ratio_responses_to_chat": medians["responses"] / medians["chat"],
        "ratio_responses_ws_to_chat": medians["responses_ws"] / medians["chat"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--streams", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=300)
    parser.add_argument("--token-rate", type=float, default=200.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.streams, args.tokens, args.rounds = 5, 60, 2
    with servers.emulator(token_rate=args.token_rate, tokens=args.tokens) as emulator:
        model = servers.emulator_model(emulator)
        with servers.sluice(ollama_url=emulator.url) as sluice:
            result = asyncio.run(_run(sluice.port, sluice.proc, model, args))
    sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")


if __name__ == "__main__":
    main()
