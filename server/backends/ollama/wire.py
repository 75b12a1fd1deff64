"""Ollama's wire format, sans I/O: request bodies out, NDJSON bytes in, results out.

`encode_generation` builds the ``/api/chat`` or ``/api/generate`` body for a `GenerationRequest`;
`StreamDecoder` takes the response body in whatever pieces the network delivers (lines split
across reads, several lines in one read, a UTF-8 character cut in two) and returns the text of
each complete line, raising on an ``{"error": ...}`` line; `result_from_final` maps the final
chunk to a `GenerationResult`. This module must never do I/O or know about httpx: the backend
feeds it bytes and the tests feed it byte strings.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import orjson

from server.backends.base import GenerationRequest, GenerationResult
from server.backends.ollama.errors import MalformedResponse, StreamEnded, UpstreamErrorLine

__all__ = [
    "CHAT_PATH",
    "GENERATE_PATH",
    "StreamDecoder",
    "decode_embed",
    "decode_tags",
    "encode_embed",
    "encode_generation",
    "result_from_final",
]

CHAT_PATH = "/api/chat"
GENERATE_PATH = "/api/generate"


def _options(request: GenerationRequest) -> dict[str, Any]:
    sampling = request.options
    options: dict[str, Any] = {}
    if sampling.max_tokens is not None:
        options["num_predict"] = sampling.max_tokens
    if sampling.stop:
        options["stop"] = list(sampling.stop)
    if sampling.seed is not None:
        options["seed"] = sampling.seed
    if sampling.temperature is not None:
        options["temperature"] = sampling.temperature
    if sampling.top_p is not None:
        options["top_p"] = sampling.top_p
    if sampling.top_k is not None:
        options["top_k"] = sampling.top_k
    return options


def encode_generation(request: GenerationRequest) -> tuple[str, bytes]:
    """The path and JSON body that stream `request` from Ollama."""
    body: dict[str, Any] = {"model": request.model, "stream": True}
    if request.messages is not None:
        path = CHAT_PATH
        messages = [{"role": turn.role, "content": turn.content} for turn in request.messages]
        if request.system is not None:
            messages.insert(0, {"role": "system", "content": request.system})
        body["messages"] = messages
    else:
        path = GENERATE_PATH
        body["prompt"] = request.prompt or ""
        if request.system is not None:
            body["system"] = request.system
    options = _options(request)
    if options:
        body["options"] = options
    if request.format is not None:
        body["format"] = request.format
    return path, orjson.dumps(body)


class StreamDecoder:
    """Turns the bytes of one streamed response into text, one `feed` per network read.

    Call `feed` with each read; it returns the text of the lines the read completed ("" when it
    completed none) and raises on an error or malformed line. When such a line follows text in the
    same read, `feed` returns the text and leaves the exception in `failure`: pass the text on,
    then raise it. After the last read call `finish`, which returns the final chunk (the line
    with ``"done": true``) or raises `StreamEnded` when there was none. `pieces` counts the lines
    that carried text, the token count to fall back on when Ollama leaves ``eval_count`` out.
    """

    __slots__ = ("_buffer", "_key", "failure", "final", "pieces")

    def __init__(self, *, chat: bool) -> None:
        self._key = "message" if chat else "response"
        self._buffer = b""
        self.pieces = 0
        self.final: dict[str, Any] | None = None
        self.failure: Exception | None = None

    def feed(self, data: bytes) -> str:
        if self._buffer:
            data = self._buffer + data
        lines = data.split(b"\n")
        # The last element is the start of a line still on its way ("" when data ended a line).
        self._buffer = lines.pop()
        if len(lines) == 1:
            return self._line(lines[0])
        parts: list[str] = []
        for line in lines:
            try:
                parts.append(self._line(line))
            except (UpstreamErrorLine, MalformedResponse, orjson.JSONDecodeError) as exc:
                if not any(parts):
                    raise
                # Deliver the text that came before the bad line first; the caller raises
                # `failure` once it has passed that text on.
                self.failure = exc
                self._buffer = b""
                break
        return "".join(parts)

    def finish(self) -> dict[str, Any]:
        if self.failure is not None:
            raise self.failure
        if self._buffer.strip():
            # A final line without its newline is still a line.
            self._line(self._buffer)
            self._buffer = b""
        if self.final is None:
            raise StreamEnded()
        return self.final

    def _line(self, line: bytes) -> str:
        if not line or line.isspace():
            return ""
        chunk = orjson.loads(line)
        if type(chunk) is not dict:
            raise MalformedResponse()
        if "error" in chunk:
            error = chunk["error"]
            raise UpstreamErrorLine(error if isinstance(error, str) else "upstream failed mid-stream")
        value = chunk.get(self._key)
        if self._key == "message":
            value = value.get("content") if type(value) is dict else None
        if chunk.get("done"):
            self.final = chunk
        if not value:
            return ""
        if type(value) is not str:
            raise MalformedResponse()
        self.pieces += 1
        return value


def _ms(chunk: dict[str, Any], key: str) -> float | None:
    value = chunk.get(key)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value / 1_000_000
    return None


def _count(chunk: dict[str, Any], key: str, fallback: int) -> int:
    value = chunk.get(key)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return fallback


def result_from_final(final: dict[str, Any], pieces: int) -> GenerationResult:
    """The result for a final chunk; `pieces` stands in for ``eval_count`` when it is absent."""
    # "load" and "unload" end a request that generated nothing; only "length" means cut short.
    finish: Literal["stop", "length"] = "length" if final.get("done_reason") == "length" else "stop"
    return GenerationResult(
        finish_reason=finish,
        prompt_tokens=_count(final, "prompt_eval_count", 0),
        completion_tokens=_count(final, "eval_count", pieces),
        load_ms=_ms(final, "load_duration"),
        prompt_eval_ms=_ms(final, "prompt_eval_duration"),
        eval_ms=_ms(final, "eval_duration"),
        total_ms=_ms(final, "total_duration"),
    )


def encode_embed(model: str, texts: Sequence[str]) -> bytes:
    return orjson.dumps({"model": model, "input": list(texts)})


def decode_embed(raw: bytes, count: int) -> npt.NDArray[np.float32]:
    """The ``(count, d)`` float32 matrix of an ``/api/embed`` answer."""
    body = orjson.loads(raw)
    embeddings = body.get("embeddings") if isinstance(body, dict) else None
    if not isinstance(embeddings, list) or len(embeddings) != count:
        raise MalformedResponse()
    try:
        matrix = np.asarray(embeddings, dtype=np.float32)
    except (TypeError, ValueError):
        raise MalformedResponse() from None
    if matrix.ndim != 2:
        raise MalformedResponse()
    return matrix


def decode_tags(raw: bytes) -> list[str]:
    """Model names from a ``/api/tags`` answer."""
    body = orjson.loads(raw)
    models = body.get("models") if isinstance(body, dict) else None
    if not isinstance(models, list):
        raise MalformedResponse()
    names: list[str] = []
    for entry in models:
        name = entry.get("name") or entry.get("model") if isinstance(entry, dict) else None
        if isinstance(name, str) and name:
            names.append(name)
    return names
