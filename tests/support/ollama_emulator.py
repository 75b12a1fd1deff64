"""An Ollama server for tests: a real HTTP/1.1 server on loopback that speaks OLLAMA.md's wire format.

Raw asyncio streams, so the tests control exactly where each write ends: NDJSON lines are cut
across writes (sometimes inside a UTF-8 character) and several lines share one write. Text is
deterministic per (prompt or messages, seed): `Emulator.expected_text` says what a request would
get. Faults are chosen by model name (`FAULT_MODELS`); every request is recorded (`RequestRecord`),
including whether the client closed its connection before the response ended, which is how tests
prove a cancel reached upstream.

In tests: ``with start_emulator(token_rate=200) as emu: ... emu.url ...`` (its own loop in a
background thread); ``emu.records`` / ``emu.generations()`` to inspect, ``emu.reset()`` to clear,
``emu.configure(...)`` to change `EmulatorConfig` for later requests, ``await emu.until(pred)``
(or ``emu.wait(pred)`` from sync code) to wait for a record to change (up to `WAIT_S`). For other processes: ``python -m tests.support.ollama_emulator --port 0``
prints ``listening on <url>`` and serves until SIGTERM, one asyncio loop for any number of streams.
This is test support: it must never be imported by ``server/`` or listen beyond 127.0.0.1 by default.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import math
import random
import signal
import threading
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Any

import orjson

from tests.support.ollama_replies import ReplyFault, format_pieces, plan_calls

__all__ = ["DEFAULT_MODELS", "FAULT_MODELS", "Emulator", "EmulatorConfig", "RequestRecord", "start_emulator"]

# How long `Emulator.wait` / `Emulator.until` wait by default for a record to change: long, since
# they return as soon as it has; a 2-core machine busy with the whole suite can take seconds.
WAIT_S = 20.0
DEFAULT_MODELS = ("llama3.2:1b", "qwen2.5:0.5b", "smollm2:135m", "nomic-embed-text")
FAULT_MODELS = (
    "fault-error-midstream",  # `fault_after` pieces, then an {"error": ...} line (status stays 200)
    "fault-malformed",  # `fault_after` pieces, then a line that is not JSON
    "fault-hang",  # `fault_after` pieces, then silence until the client leaves
    "fault-hang-before-first",  # status and headers, then silence
    "fault-hang-headers",  # nothing at all, not even the status line
    "fault-drop",  # `fault_after` pieces and half a line, then the connection closes
    "fault-no-stats",  # a final chunk without counts or durations
    "fault-503",
    "fault-429",
    "fault-500",
    "fault-400",
)
_FAULT_STATUS: dict[str, tuple[int, str]] = {
    "fault-503": (503, "server busy, please try again.  maximum pending requests exceeded"),
    "fault-429": (429, "too many requests"),
    "fault-500": (500, "llama runner process has terminated: signal: killed"),
    "fault-400": (400, "invalid options: num_ctx"),
}
_MIDSTREAM_FAULTS = ("fault-error-midstream", "fault-malformed", "fault-hang", "fault-drop")
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 411: "Length Required", 429: "Too Many Requests"}
_REASONS |= {500: "Internal Server Error", 503: "Service Unavailable"}
# Multi-byte words on purpose: a cut between writes lands inside a UTF-8 character now and then.
_WORDS = (
    "the river sluice gate opens slowly and water runs past old stone under grey light while "
    "a heron waits near café naïve über Zürich 東京 québec — ✓ fish rise to meet the evening"
).split()


@dataclasses.dataclass(frozen=True)
class EmulatorConfig:
    token_rate: float = 0.0  # pieces per second per stream; 0 = as fast as the socket takes them
    tokens: int = 16  # pieces in a natural ("stop") answer; num_predict cuts it short ("length")
    first_token_delay_s: float = 0.0  # prompt evaluation before the first piece
    lines_per_write: int = 2
    split_lines: bool = True  # each write ends inside a line, the rest opening the next write
    max_parallel: int = 0  # generations at once before 503; 0 = unlimited
    fault_after: int = 3  # pieces sent before a mid-stream fault
    retry_after_s: int | None = 2  # Retry-After on 429/503
    models: tuple[str, ...] = DEFAULT_MODELS
    embed_dimensions: int = 16
    version: str = "0.6.2"
    keep_records: bool = True  # off for long benchmark runs, where records would only grow
    advertise_faults: bool = False  # list FAULT_MODELS in /api/tags too (they always answer)
    tool_calls: int = 1  # calls in a reply to a chat offering tools (the first offered tools)
    text_before_calls: int = 2  # pieces of text such a reply streams before its calls
    reply_fault: ReplyFault = ReplyFault.NONE  # a promise about tools or format to break


@dataclasses.dataclass(eq=False)
class RequestRecord:
    method: str
    path: str
    body: Any
    started: float = dataclasses.field(default_factory=time.monotonic)
    status: int = 0
    outcome: str = "pending"  # completed | client_closed | fault | stopped
    client_closed_early: bool = False
    closed_at: float | None = None  # monotonic time the early close was seen
    finished: float | None = None
    pieces_sent: int = 0
    writes: int = 0
    planned: tuple[str, ...] = ()
    calls: tuple[dict[str, Any], ...] = ()  # the tool_calls entries the reply carries
    connection: int = 0  # which client connection carried it (numbered from 1 in accept order)

    @property
    def model(self) -> str | None:
        model = self.body.get("model") if isinstance(self.body, dict) else None
        return model if isinstance(model, str) else None

    @property
    def options(self) -> dict[str, Any]:
        options = self.body.get("options") if isinstance(self.body, dict) else None
        return options if isinstance(options, dict) else {}

    @property
    def text_sent(self) -> str:
        return "".join(self.planned[: self.pieces_sent])


def _material(body: dict[str, Any]) -> list[Any]:
    if "messages" in body:
        messages = body.get("messages") or []
        return [[m.get("role"), m.get("content")] for m in messages if isinstance(m, dict)]
    return [body.get("system"), body.get("prompt") or ""]


def plan_text(body: dict[str, Any], tokens: int) -> tuple[list[str], str]:
    """The pieces a generation body gets and its done_reason."""
    material = _material(body)
    if material in ([], [None, ""]):
        return [], "load"
    raw_options = body.get("options")
    options: dict[str, Any] = raw_options if isinstance(raw_options, dict) else {}
    key = orjson.dumps([material, options.get("seed")])
    rng = random.Random(hashlib.sha256(key).digest())
    count, reason = tokens, "stop"
    limit = options.get("num_predict")
    if isinstance(limit, int) and 0 <= limit < tokens:
        count, reason = limit, "length"
    pieces = [("" if i == 0 else " ") + rng.choice(_WORDS) for i in range(count)]
    stops = [s for s in options.get("stop") or () if isinstance(s, str) and s]
    text = "".join(pieces)
    cuts = [at for at in (text.find(s) for s in stops) if at >= 0]
    if cuts:
        cut, kept, size = min(cuts), [], 0
        for piece in pieces:
            if size + len(piece) > cut:
                if cut > size:
                    kept.append(piece[: cut - size])
                break
            kept.append(piece)
            size += len(piece)
        pieces, reason = kept, "stop"
    return pieces, reason


def plan_reply(body: dict[str, Any], cfg: EmulatorConfig) -> tuple[list[str], str, list[dict[str, Any]]]:
    """`plan_text`, then what ``tools`` (a chat's calls) and ``format`` (JSON text) change."""
    pieces, reason = plan_text(body, cfg.tokens)
    calls = plan_calls(body, cfg.tool_calls, cfg.reply_fault) if "messages" in body else []
    shaped = format_pieces(body, cfg.reply_fault)
    if calls:
        pieces = pieces[: cfg.text_before_calls]
    elif shaped is not None and pieces:
        limit = (body.get("options") or {}).get("num_predict")
        pieces, reason = shaped, "stop"
        if isinstance(limit, int) and 0 <= limit < len(shaped):
            pieces, reason = shaped[:limit], "length"
    return pieces, reason, calls


def embedding_for(text: str, dimensions: int) -> list[float]:
    """The unit vector /api/embed returns for `text`."""
    rng = random.Random(hashlib.sha256(text.encode()).digest())
    vector = [rng.gauss(0.0, 1.0) for _ in range(dimensions)]
    norm = math.sqrt(sum(v * v for v in vector)) or 1.0
    return [v / norm for v in vector]


def _http_date() -> str:
    return datetime.now(UTC).strftime("%a, %d %b %Y %H:%M:%S GMT")


def _head(status: int, headers: dict[str, str]) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}", f"Date: {_http_date()}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _response(status: int, body: Any, headers: dict[str, str] | None = None) -> bytes:
    raw = orjson.dumps(body)
    all_headers = {"Content-Type": "application/json; charset=utf-8", "Content-Length": str(len(raw))}
    return _head(status, all_headers | (headers or {})) + raw


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class _BadRequest(Exception):
    pass


class _Connection:
    """One client connection: a byte buffer over the reader, so a watcher and the parser share it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.buffer = bytearray()
        self.number = 0

    async def fill(self) -> bool:
        data = await self.reader.read(65536)
        self.buffer += data
        return bool(data)

    async def request(self) -> tuple[str, str, dict[bytes, bytes], bytes] | None:
        while (end := self.buffer.find(b"\r\n\r\n")) < 0:
            if len(self.buffer) > 65536:
                raise _BadRequest()
            if not await self.fill():
                return None
        head = bytes(self.buffer[:end]).split(b"\r\n")
        del self.buffer[: end + 4]
        method, target, _ = head[0].decode("latin-1").split(" ", 2)
        headers = {}
        for line in head[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        if b"chunked" in headers.get(b"transfer-encoding", b""):
            raise _BadRequest()
        length = int(headers.get(b"content-length", b"0"))
        while len(self.buffer) < length:
            if not await self.fill():
                return None
        body = bytes(self.buffer[:length])
        del self.buffer[:length]
        return method, target.split("?", 1)[0], headers, body


class EmulatorServer:
    """The emulator itself, on whatever loop runs it (the CLI's, or `Emulator`'s thread)."""

    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        self.records: list[RequestRecord] = []
        self.lock = threading.Lock()
        self.busy = 0
        self.loaded: set[str] = set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._accepted = 0

    async def start(self, host: str, port: int) -> int:
        self._server = await asyncio.start_server(self._serve, host, port, backlog=4096)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        conn = _Connection(reader, writer)
        self._accepted += 1
        conn.number = self._accepted
        try:
            while (request := await conn.request()) is not None:
                method, path, headers, raw = request
                if not await self._dispatch(conn, method, path, raw):
                    break
                if headers.get(b"connection", b"").lower() == b"close":
                    break
        except (_BadRequest, ValueError):
            with contextlib.suppress(ConnectionError):
                writer.write(_response(400, {"error": "bad request"}, {"Connection": "close"}))
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    def _record(self, method: str, path: str, body: Any) -> RequestRecord:
        record = RequestRecord(method, path, body)
        if self.config.keep_records:
            with self.lock:
                self.records.append(record)
        return record

    async def _dispatch(self, conn: _Connection, method: str, path: str, raw: bytes) -> bool:
        """Answer one request; False when the connection must close afterwards."""
        body: Any = None
        if raw:
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError:
                body = raw.decode("utf-8", "replace")
        record = self._record(method, path, body)
        record.connection = conn.number
        cfg = self.config
        match method, path:
            case "GET" | "HEAD", "/":
                return await self._send(conn, record, _response(200, "Ollama is running"))
            case "GET", "/api/version":
                return await self._send(conn, record, _response(200, {"version": cfg.version}))
            case "GET", "/api/tags":
                names = cfg.models + (FAULT_MODELS if cfg.advertise_faults else ())
                models = [self._tag(name) for name in names]
                return await self._send(conn, record, _response(200, {"models": models}))
            case "GET", "/api/ps":
                loaded = (
                    sorted(self.loaded) if cfg.advertise_faults else sorted(self.loaded - set(FAULT_MODELS))
                )
                models = [self._tag(name) for name in loaded]
                return await self._send(conn, record, _response(200, {"models": models}))
            case "POST", "/api/show":
                return await self._send(conn, record, self._show(body))
            case "POST", "/api/generate" | "/api/chat" | "/api/embed" | "/api/embeddings" as endpoint:
                return await self._model_call(conn, record, endpoint, body, cfg)
            case _:
                return await self._send(conn, record, _response(404, {"error": "404 page not found"}))

    @staticmethod
    def _tag(name: str) -> dict[str, Any]:
        digest = hashlib.sha256(name.encode()).hexdigest()
        details = {"format": "gguf", "family": name.split(":")[0], "parameter_size": "1B"}
        entry = {"name": name, "model": name, "modified_at": "2025-01-01T00:00:00Z", "size": 1 << 30}
        return entry | {"digest": digest, "details": details}

    def _show(self, body: Any) -> bytes:
        model = body.get("model") or body.get("name") if isinstance(body, dict) else None
        if not isinstance(model, str) or not self._known(model):
            return _response(404, {"error": f"model '{model}' not found"})
        embedding = "embed" in model
        family = model.split(":")[0]
        answer = {
            "modelfile": f"FROM {model}\n",
            "parameters": 'stop "<|eot_id|>"',
            "template": "{{ .Prompt }}",
            "details": self._tag(model)["details"],
            "model_info": {"general.architecture": family, f"{family}.context_length": 4096},
            "capabilities": ["embedding"] if embedding else ["completion", "tools"],
            "modified_at": "2025-01-01T00:00:00Z",
        }
        return _response(200, answer)

    def _known(self, model: str) -> bool:
        models = self.config.models
        return model in models or f"{model}:latest" in models or model.removesuffix(":latest") in models

    async def _send(self, conn: _Connection, record: RequestRecord, data: bytes, keep: bool = True) -> bool:
        # The record is final before the last byte leaves: a client may read it at once.
        record.status = int(data[9:12])
        record.outcome = "completed" if record.status == 200 else "rejected"
        record.finished = time.monotonic()
        conn.writer.write(data)
        await conn.writer.drain()
        return keep

    async def _model_call(
        self, conn: _Connection, record: RequestRecord, endpoint: str, body: Any, cfg: EmulatorConfig
    ) -> bool:
        model = body.get("model") if isinstance(body, dict) else None
        if not isinstance(model, str) or not model:
            return await self._send(conn, record, _response(400, {"error": "model is required"}))
        if model in _FAULT_STATUS:
            status, message = _FAULT_STATUS[model]
            headers = {"Retry-After": str(cfg.retry_after_s)} if cfg.retry_after_s is not None else {}
            headers = headers if status in (429, 503) else {}
            return await self._send(conn, record, _response(status, {"error": message}, headers))
        if not model.startswith("fault-") and not self._known(model):
            error = f'model "{model}" not found, try pulling it first'
            return await self._send(conn, record, _response(404, {"error": error}))
        assert isinstance(body, dict)
        if endpoint == "/api/embed":
            inputs = body.get("input")
            texts = [inputs] if isinstance(inputs, str) else list(inputs or [])
            vectors = [embedding_for(str(text), cfg.embed_dimensions) for text in texts]
            answer = {"model": model, "embeddings": vectors, "total_duration": 1000, "load_duration": 0}
            answer["prompt_eval_count"] = sum(len(str(text).split()) for text in texts)
            return await self._send(conn, record, _response(200, answer))
        if endpoint == "/api/embeddings":
            vector = [v * 7.5 for v in embedding_for(str(body.get("prompt", "")), cfg.embed_dimensions)]
            return await self._send(conn, record, _response(200, {"embedding": vector}))
        if cfg.max_parallel and self.busy >= cfg.max_parallel:
            busy = {"error": _FAULT_STATUS["fault-503"][1]}
            headers = {"Retry-After": str(cfg.retry_after_s)} if cfg.retry_after_s is not None else {}
            return await self._send(conn, record, _response(503, busy, headers))
        pieces, reason, calls = plan_reply(body, cfg)
        record.planned = tuple(pieces)
        record.calls = tuple(calls)
        self.busy += 1
        self.loaded.add(model)
        try:
            return await self._watched(
                conn, record, self._generate(conn, record, endpoint, body, cfg, reason)
            )
        finally:
            self.busy -= 1

    async def _watched(
        self, conn: _Connection, record: RequestRecord, work: Coroutine[Any, Any, bool]
    ) -> bool:
        """Run `work` while watching the socket, so a client that leaves is seen at once."""
        worker = asyncio.ensure_future(work)
        watcher = asyncio.ensure_future(conn.fill())
        try:
            while True:
                await asyncio.wait({worker, watcher}, return_when=asyncio.FIRST_COMPLETED)
                if worker.done():
                    break
                if watcher.exception() is not None or not watcher.result():
                    self._closed_early(record)
                    return False
                # Bytes of a pipelined request: keep them in the buffer and keep watching.
                watcher = asyncio.ensure_future(conn.fill())
        finally:
            for task in (worker, watcher):
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                        await task
        try:
            return worker.result()
        except ConnectionError:
            self._closed_early(record)
            return False

    @staticmethod
    def _closed_early(record: RequestRecord) -> None:
        if record.finished is None:
            record.client_closed_early = True
            record.closed_at = time.monotonic()
            record.outcome = "client_closed"
            record.finished = record.closed_at

    async def _generate(
        self,
        conn: _Connection,
        record: RequestRecord,
        endpoint: str,
        body: dict[str, Any],
        cfg: EmulatorConfig,
        reason: str,
    ) -> bool:
        loop = asyncio.get_running_loop()
        writer = conn.writer
        model = body["model"]
        chat = endpoint == "/api/chat"
        pieces = record.planned
        t_start = time.perf_counter_ns()
        if model == "fault-hang-headers":
            await asyncio.Event().wait()
        if not body.get("stream", True):
            delay = cfg.first_token_delay_s + (len(pieces) / cfg.token_rate if cfg.token_rate else 0.0)
            await asyncio.sleep(delay)
            final = self._final(body, chat, pieces, reason, t_start, t_start, model == "fault-no-stats")
            final["message" if chat else "response"] = (
                {"role": "assistant", "content": "".join(pieces)} if chat else "".join(pieces)
            )
            if record.calls:
                final["message"]["tool_calls"] = list(record.calls)
            record.pieces_sent = len(pieces)
            return await self._send(conn, record, _response(200, final))
        head = {"Content-Type": "application/x-ndjson", "Transfer-Encoding": "chunked"}
        writer.write(_head(200, head))
        record.status = 200
        await writer.drain()
        if model == "fault-hang-before-first":
            await asyncio.Event().wait()
        model_json = orjson.dumps(model)
        stop_at = cfg.fault_after if model in _MIDSTREAM_FAULTS else None
        sent = pieces if stop_at is None else pieces[:stop_at]
        interval = 1.0 / cfg.token_rate if cfg.token_rate > 0 else 0.0
        t0 = loop.time() + cfg.first_token_delay_s
        per_write = max(1, cfg.lines_per_write)
        pending = b""
        t_first = 0
        for start in range(0, len(sent), per_write):
            group = sent[start : start + per_write]
            delay = t0 + (start + len(group) - 1) * interval - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            prefix = b'{"model":%s,"created_at":"%s",' % (model_json, _created_at())
            lines = [self._line(prefix, piece, chat) for piece in group]
            data = pending + b"".join(lines)
            # Keep a varying part of the last line for the next write, so over a stream the
            # cuts land everywhere in a line, inside multi-byte characters included.
            keep = 1 + (record.writes * 37) % (len(lines[-1]) - 1)
            cut = len(data) - keep if cfg.split_lines else len(data)
            pending = data[cut:]
            record.writes += 1
            record.pieces_sent = start + len(group)
            t_first = t_first or time.perf_counter_ns()
            writer.write(_chunk(data[:cut]))
            await writer.drain()
        t_first = t_first or time.perf_counter_ns()
        if stop_at is not None:
            return await self._fault(conn, record, model, pending)
        for call in record.calls:
            # Each call complete in a chunk of its own, arguments an object (OLLAMA.md).
            message = {"role": "assistant", "content": "", "tool_calls": [call]}
            line = {"model": model, "created_at": _created_at().decode(), "message": message, "done": False}
            record.writes += 1
            writer.write(_chunk(pending + orjson.dumps(line) + b"\n"))
            pending = b""
            await writer.drain()
        final = self._final(body, chat, pieces, reason, t_start, t_first, model == "fault-no-stats")
        record.writes += 1
        record.outcome = "completed"
        record.finished = time.monotonic()
        writer.write(_chunk(pending + orjson.dumps(final) + b"\n") + b"0\r\n\r\n")
        await writer.drain()
        return True

    @staticmethod
    def _line(prefix: bytes, piece: str, chat: bool) -> bytes:
        text = orjson.dumps(piece)
        if chat:
            return b'%s"message":{"role":"assistant","content":%s},"done":false}\n' % (prefix, text)
        return b'%s"response":%s,"done":false}\n' % (prefix, text)

    async def _fault(self, conn: _Connection, record: RequestRecord, model: str, pending: bytes) -> bool:
        writer = conn.writer
        record.outcome = "fault"
        if model == "fault-hang":
            writer.write(_chunk(pending))
            await writer.drain()
            await asyncio.Event().wait()
        if model == "fault-drop":
            record.finished = time.monotonic()
            writer.write(_chunk(pending + b'{"model":"fault-drop","created_at":"'))
            await writer.drain()
            return False
        line = b"this is not json\n"
        if model == "fault-error-midstream":
            line = orjson.dumps({"error": "an error was encountered while running the model: unexpected EOF"})
            line += b"\n"
        record.finished = time.monotonic()
        writer.write(_chunk(pending + line) + b"0\r\n\r\n")
        await writer.drain()
        return True

    @staticmethod
    def _final(
        body: dict[str, Any],
        chat: bool,
        pieces: tuple[str, ...],
        reason: str,
        t_start: int,
        t_first: int,
        bare: bool,
    ) -> dict[str, Any]:
        final: dict[str, Any] = {"model": body["model"], "created_at": _created_at().decode()}
        final |= {"message": {"role": "assistant", "content": ""}} if chat else {"response": ""}
        final |= {"done": True, "done_reason": reason}
        if bare:
            return final
        if not chat:
            final["context"] = [1, 2, 3]
        t_end = time.perf_counter_ns()
        words = sum(len(str(part or "").split()) for part in _flatten(_material(body)))
        final |= {
            "total_duration": t_end - t_start,
            "load_duration": 1_000,
            "prompt_eval_count": words + 1,
            "prompt_eval_duration": max(1, t_first - t_start),
            "eval_count": len(pieces),
            "eval_duration": max(1, t_end - t_first),
        }
        return final


def _flatten(items: list[Any]) -> list[Any]:
    return [x for item in items for x in (item if isinstance(item, list) else [item])]


def _created_at() -> bytes:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ").encode()


class Emulator:
    """A running emulator on its own loop in a background thread; use `start_emulator`."""

    def __init__(self, config: EmulatorConfig, host: str = "127.0.0.1", port: int = 0) -> None:
        self._server = EmulatorServer(config)
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            try:
                self.port = self._loop.run_until_complete(self._server.start(host, port))
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                return
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="ollama-emulator", daemon=True)
        self._thread.start()
        ready.wait(10)
        if failure:
            self._loop.close()
            raise failure[0]
        self.url = f"http://{host}:{self.port}"

    @property
    def config(self) -> EmulatorConfig:
        return self._server.config

    def configure(self, **changes: Any) -> None:
        """Change the config for requests that start from now on."""
        self._server.config = dataclasses.replace(self._server.config, **changes)

    @property
    def records(self) -> list[RequestRecord]:
        with self._server.lock:
            return list(self._server.records)

    def generations(self) -> list[RequestRecord]:
        return [r for r in self.records if r.path in ("/api/generate", "/api/chat")]

    def reset(self) -> None:
        with self._server.lock:
            self._server.records.clear()

    @property
    def busy(self) -> int:
        return self._server.busy

    def expected_text(self, body: dict[str, Any]) -> str:
        """The full text a generate or chat body (as sent upstream) streams back."""
        return "".join(plan_reply(body, self.config)[0])

    def expected_embedding(self, text: str) -> list[float]:
        return embedding_for(text, self.config.embed_dimensions)

    def wait(self, predicate: Callable[[], bool], timeout: float = WAIT_S) -> bool:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)
        return True

    async def until(self, predicate: Callable[[], bool], within: float = WAIT_S) -> bool:
        """`wait` for async tests: polls without blocking the caller's loop."""
        deadline = time.monotonic() + within
        while not predicate():
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.005)
        return True

    def stop(self) -> None:
        if self._loop.is_closed():
            return
        future = asyncio.run_coroutine_threadsafe(self._server.close(), self._loop)
        with contextlib.suppress(Exception):
            future.result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> Emulator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_emulator(*, host: str = "127.0.0.1", port: int = 0, **config: Any) -> Emulator:
    """Start an emulator (fields of `EmulatorConfig` as keywords); stop it or use it as a context manager."""
    return Emulator(EmulatorConfig(**config), host, port)


async def _main(args: argparse.Namespace) -> None:
    config = EmulatorConfig(
        token_rate=args.token_rate,
        tokens=args.tokens,
        first_token_delay_s=args.first_token_delay,
        lines_per_write=args.lines_per_write,
        split_lines=not args.no_split,
        max_parallel=args.max_parallel,
        models=tuple(args.models.split(",")) if args.models else DEFAULT_MODELS,
        keep_records=False,
        advertise_faults=args.advertise_faults,
    )
    server = EmulatorServer(config)
    port = await server.start(args.host, args.port)
    print(f"listening on http://{args.host}:{port}", flush=True)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    await server.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Ollama emulator for tests and benchmarks")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=11434)
    parser.add_argument("--token-rate", type=float, default=0.0, help="pieces/s per stream, 0 = unpaced")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--first-token-delay", type=float, default=0.0)
    parser.add_argument("--lines-per-write", type=int, default=2)
    parser.add_argument("--no-split", action="store_true", help="end every write on a line boundary")
    parser.add_argument("--max-parallel", type=int, default=0)
    parser.add_argument("--models", default="", help="comma-separated model names")
    parser.add_argument("--advertise-faults", action="store_true", help="list the fault models in /api/tags")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop (for benchmarks)")
    args = parser.parse_args(argv)
    if args.uvloop:
        import uvloop

        uvloop.run(_main(args))
    else:
        asyncio.run(_main(args))


if __name__ == "__main__":
    main()
