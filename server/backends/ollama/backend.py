"""The Ollama backend: streams tokens from one or more Ollama servers over one pooled httpx client.

`OllamaBackend` is a `Generator` (``/api/chat`` for messages, ``/api/generate`` for a prompt,
NDJSON streamed and decoded by `StreamDecoder`; `relay` hands each piece on from the connection's
read callback instead of yielding it) and also lists models (``/api/tags``), embeds
(``/api/embed``), probes (``/api/version``) and relays model metadata (``/api/show``,
``/api/ps``). Each request goes to the least busy healthy base URL (`UpstreamPool`); a connect failure before any output moves on to the next one. A consumer
that closes the generator or cancels its task closes the upstream response at once, never
draining it: that is how Ollama learns to stop generating. Every exception leaves through
`translate`, so callers only ever see `SluiceError`. No transport or protocol code lives here.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import orjson

from server.backends.base import (
    Embedder,
    GenerationItem,
    GenerationRequest,
    GenerationResult,
    Generator,
    ToolCall,
)
from server.backends.ollama.checks import ReplyCheck
from server.backends.ollama.errors import (
    MalformedResponse,
    NoUpstream,
    UpstreamStatus,
    error_text,
    retry_after_ms,
    translate,
)
from server.backends.ollama.guard import StallGuard
from server.backends.ollama.health import OLLAMA_PREFIX
from server.backends.ollama.pool import Upstream, UpstreamPool
from server.backends.ollama.transport import UpstreamTransport, body_stream, pipe_body
from server.backends.ollama.wire import (
    CHAT_PATH,
    StreamDecoder,
    decode_embed,
    decode_tags,
    encode_embed,
    encode_generation,
    result_from_final,
)
from server.settings import Settings

__all__ = ["OLLAMA_PREFIX", "OllamaBackend", "OllamaEmbedder"]

# Every stream holds one HTTP/1.1 connection, and the relay must carry hundreds of streams at once.
_MAX_CONNECTIONS = 4096
_KEEPALIVE_S = 30.0
_PROBE_TIMEOUT_S = 2.0
# Error bodies are one short JSON object; never buffer more of a misbehaving one.
_MAX_ERROR_BODY = 8192
_JSON_HEADERS = {"Content-Type": "application/json", "Accept": "application/x-ndjson, application/json"}


class OllamaBackend(Generator):
    def __init__(self, settings: Settings, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._pool = UpstreamPool(settings.ollama_urls, retry_unhealthy_s=settings.ollama_retry_unhealthy_s)
        self._first_token_s = settings.ollama_first_token_timeout_s
        self._idle_s = settings.ollama_idle_timeout_s
        connect = settings.ollama_connect_timeout_s
        # Stream reads are bounded by StallGuard, not by httpx, so the first-token and idle limits
        # can differ; one-shot calls (embed, tags) get a read limit of their own.
        self._stream_timeout = httpx.Timeout(connect=connect, read=None, write=connect, pool=connect)
        self._call_timeout = httpx.Timeout(
            connect=connect, read=settings.ollama_first_token_timeout_s, write=connect, pool=connect
        )
        probe = min(connect, _PROBE_TIMEOUT_S)
        self._probe_timeout = httpx.Timeout(probe)
        if transport is None:
            transport = UpstreamTransport(max_connections=_MAX_CONNECTIONS, keepalive_expiry=_KEEPALIVE_S)
        # trust_env=False: a proxy from the environment must never sit between sluice and Ollama.
        self._client = httpx.AsyncClient(transport=transport, headers=_JSON_HEADERS, trust_env=False)
        # POSTs go to the transport itself (see `_open`); the client builds them and does the GETs.
        self._transport = transport

    @property
    def urls(self) -> list[str]:
        return [upstream.url for upstream in self._pool.upstreams]

    def status(self) -> dict[str, dict[str, object]]:
        """Per base URL: healthy, requests in flight, consecutive connect failures."""
        return self._pool.status()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationItem]:
        path, body = encode_generation(request)
        decoder = StreamDecoder(chat=path == CHAT_PATH)
        check = ReplyCheck(request)
        guard = StallGuard(self._first_token_s, self._idle_s)
        async with self._streaming(request, path, body, guard) as response:
            first = True
            async for data in body_stream(response):
                text = decoder.feed(data)
                calls = decoder.take_calls() if decoder.calls else None
                if text or calls:
                    if first:
                        first = False
                        guard.first_piece()
                    guard.received()
                    if text:
                        yield check.text(text)
                    # A read that completed text and a call gives the text first.
                    for call in calls or ():
                        yield check.call(call)
                    guard.waiting()
                if decoder.failure is not None:
                    raise decoder.failure
            # Reading on to the end of the body (not stopping at the done line) lets httpx put the
            # connection back in the pool.
            result = check.finish(result_from_final(decoder.finish(), decoder.pieces))
        yield result

    async def relay(
        self,
        request: GenerationRequest,
        on_text: Callable[[str], None],
        on_call: Callable[[ToolCall], None],
    ) -> GenerationResult:
        """`generate`'s items, each handed on from the upstream connection's read callback as its
        line is decoded (`pipe_body`): the awaiting task is woken when the stream ends, not per
        token. Once that task is cancelled nothing more is handed on."""
        path, body = encode_generation(request)
        decoder = StreamDecoder(chat=path == CHAT_PATH)
        check = ReplyCheck(request)
        guard = StallGuard(self._first_token_s, self._idle_s)
        task = asyncio.current_task()
        assert task is not None
        cancelled_before = task.cancelling()
        first = True
        keep = check.text if check.checks_text else None

        def feed(data: bytes) -> None:
            nonlocal first
            if task.cancelling() > cancelled_before:
                return  # cancelled (by the consumer or the guard): it ends at its next step
            text = decoder.feed(data)
            calls = decoder.take_calls() if decoder.calls else None
            if text or calls:
                if first:
                    first = False
                    guard.first_piece()
                if text:
                    if keep is not None:
                        keep(text)
                    on_text(text)
                # A read that completed text and a call gives the text first.
                for call in calls or ():
                    on_call(check.call(call))
                guard.waiting()  # the guard counts from the last piece handed on
            if decoder.failure is not None:
                raise decoder.failure

        async with self._streaming(request, path, body, guard) as response:
            await pipe_body(response, feed)
            return check.finish(result_from_final(decoder.finish(), decoder.pieces))

    @contextlib.asynccontextmanager
    async def _streaming(
        self, request: GenerationRequest, path: str, body: bytes, guard: StallGuard
    ) -> AsyncIterator[httpx.Response]:
        """A streamed generation's response (status 200, else its error raised), the guard
        running; what its body's reading raises, translated (a cancel by the guard: its stall);
        after it, the body closed and the upstream's count of requests in flight put back."""
        upstream: Upstream | None = None
        response: httpx.Response | None = None
        guard.start()
        try:
            upstream, response = await self._open(path, body, self._stream_timeout)
            if response.status_code != 200:
                raise await _status_error(response)
            yield response
        except asyncio.CancelledError:
            stall = guard.expired()
            if stall is None:
                raise
            raise translate(stall, model=request.model) from None
        except Exception as exc:
            raise translate(exc, model=request.model) from exc
        finally:
            guard.stop()
            if response is not None:
                # Unread body: httpx closes the connection instead of draining it.
                await response.aclose()
            if upstream is not None:
                upstream.inflight -= 1

    async def embed(self, model: str, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """One float32 row per text from ``/api/embed`` (Ollama returns them L2-normalised)."""
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        try:
            upstream, response = await self._open(
                "/api/embed", encode_embed(model, texts), self._call_timeout
            )
            try:
                if response.status_code != 200:
                    raise await _status_error(response)
                return decode_embed(await response.aread(), len(texts))
            finally:
                await response.aclose()
                upstream.inflight -= 1
        except Exception as exc:
            raise translate(exc, model=model) from exc

    async def list_models(self) -> list[str]:
        """The union of ``/api/tags`` over every base URL that answers, sorted."""
        upstreams = self._pool.upstreams
        if not upstreams:
            raise translate(NoUpstream())
        answers = await asyncio.gather(*(self._tags(up) for up in upstreams), return_exceptions=True)
        names: set[str] = set()
        failure: BaseException | None = None
        for answer in answers:
            if isinstance(answer, BaseException):
                failure = failure or answer
            else:
                names.update(answer)
        if failure is not None and not names and all(isinstance(a, BaseException) for a in answers):
            raise translate(failure)
        return sorted(names)

    async def show(self, model: str) -> dict[str, Any]:
        """Ollama's ``/api/show`` answer for ``model``, as it sent it (404: ``model_not_found``)."""
        try:
            upstream, response = await self._open(
                "/api/show", orjson.dumps({"model": model}), self._call_timeout
            )
            try:
                if response.status_code != 200:
                    raise await _status_error(response)
                body = orjson.loads(await response.aread())
            finally:
                await response.aclose()
                upstream.inflight -= 1
        except Exception as exc:
            raise translate(exc, model=model) from exc
        if not isinstance(body, dict):
            raise translate(MalformedResponse(), model=model)
        return body

    async def running(self) -> list[dict[str, Any]]:
        """The ``models`` of ``/api/ps`` from every base URL that answers; ``[]`` when none does
        (what is loaded upstream is information, never a reason to fail)."""
        answers = await asyncio.gather(
            *(self._ps(upstream) for upstream in self._pool.upstreams), return_exceptions=True
        )
        return [entry for answer in answers if isinstance(answer, list) for entry in answer]

    async def probe(self) -> dict[str, bool]:
        """Base URL → whether ``/api/version`` answered; updates each URL's health."""
        answers = await asyncio.gather(
            *(self._version(up) for up in self._pool.upstreams), return_exceptions=True
        )
        reachable: dict[str, bool] = {}
        for upstream, answer in zip(self._pool.upstreams, answers, strict=True):
            ok = answer is True
            reachable[upstream.url] = ok
            if ok:
                self._pool.answered(upstream)
            else:
                self._pool.connect_failed(upstream)
        return reachable

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _open(self, path: str, body: bytes, limits: httpx.Timeout) -> tuple[Upstream, httpx.Response]:
        """Send to the best upstream, moving on while connects fail; the response is unread.

        The returned upstream counts this request as in flight: the caller decrements it. The
        request is built by the client (headers, timeouts) and handed to the transport directly:
        the client's send would only add what these POSTs never use (auth, redirects, cookies,
        event hooks) and one more generator around the body, once per read.
        """
        failure: Exception = NoUpstream()
        for upstream in self._pool.candidates():
            upstream.inflight += 1
            request = self._client.build_request("POST", upstream.url + path, content=body, timeout=limits)
            try:
                response = await self._transport.handle_async_request(request)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                upstream.inflight -= 1
                self._pool.connect_failed(upstream)
                failure = exc
                continue
            except BaseException:
                upstream.inflight -= 1
                raise
            self._pool.answered(upstream)
            return upstream, response
        raise failure

    async def _tags(self, upstream: Upstream) -> list[str]:
        response = await self._client.get(upstream.url + "/api/tags", timeout=self._call_timeout)
        if response.status_code != 200:
            raise UpstreamStatus(response.status_code, error_text(response.content), None)
        return decode_tags(response.content)

    async def _ps(self, upstream: Upstream) -> list[dict[str, Any]]:
        response = await self._client.get(upstream.url + "/api/ps", timeout=self._probe_timeout)
        models = orjson.loads(response.content).get("models") if response.status_code == 200 else None
        return [entry for entry in models if isinstance(entry, dict)] if isinstance(models, list) else []

    async def _version(self, upstream: Upstream) -> bool:
        response = await self._client.get(upstream.url + "/api/version", timeout=self._probe_timeout)
        return response.status_code == 200


async def _status_error(response: httpx.Response) -> UpstreamStatus:
    raw = bytearray()
    async for data in response.aiter_bytes():
        raw += data
        if len(raw) >= _MAX_ERROR_BODY:
            break
    return UpstreamStatus(
        response.status_code,
        error_text(bytes(raw[:_MAX_ERROR_BODY])),
        retry_after_ms(response.headers.get("retry-after")),
    )


class OllamaEmbedder(Embedder):
    """One Ollama embedding model as an `Embedder`; ``ollama/<name>`` and ``<name>`` both work.

    `dimensions` is 0 until the first answer (Ollama does not say it in advance). Ollama already
    returns unit vectors, so ``normalize=False`` cannot give back raw lengths.
    """

    def __init__(self, backend: OllamaBackend, model: str) -> None:
        self._backend = backend
        self.model = model.removeprefix(OLLAMA_PREFIX)
        self.dimensions = 0

    async def embed(self, texts: Sequence[str], *, normalize: bool = True) -> npt.NDArray[np.float32]:
        if not texts:
            return np.zeros((0, self.dimensions), dtype=np.float32)
        matrix = await self._backend.embed(self.model, texts)
        self.dimensions = int(matrix.shape[1])
        if normalize:
            norms = np.linalg.norm(matrix, axis=1, keepdims=True)
            np.divide(matrix, norms, out=matrix, where=norms > 0)
        return matrix
