"""The httpx transport the Ollama backend uses, and the httpcore-based one it replaced.

`UpstreamTransport` is what the backend builds: by default `HttpcoreTransport`. Clearing
`USE_HTTPCORE` selects `FastTransport` (asyncio protocols parsed by httptools, see
`server.backends.ollama.fast`): on `bench.relay` with 500 streams it cut the server's CPU per
relayed token from ~94-100 µs to ~69-80 µs on this machine, but its p99 added inter-token delay
was worse in every run (230-449 ms against 29-282 ms), for reasons not yet found, so it is not
the default until that is understood.

`HttpcoreTransport` is several httpcore connection pools. httpcore's pool re-examines every
connection it holds whenever a request starts or ends, and its idle-connection check walks the
whole list again for each idle connection: the cost per request grows with the square of the
pool's size. With 100 concurrent streams of 100 tokens that cost was ~75% of the relay's CPU
(230 µs/token against 53 µs/token split over 16 pools, measured on this machine), so requests are
spread over `shards` small pools in turn. Each pool reads through `LoopBackend` (plain asyncio
protocols) instead of httpcore's anyio backend (see `server.backends.ollama.net`).
"""

from __future__ import annotations

import functools
import itertools
import ssl

import httpcore
import httpx

from server.backends.ollama.fast import FastTransport
from server.backends.ollama.net import LoopBackend

__all__ = ["USE_HTTPCORE", "HttpcoreTransport", "ShardedTransport", "UpstreamTransport"]

# Read when a transport is built: False selects FastTransport (see the module docstring).
USE_HTTPCORE = True


class UpstreamTransport(httpx.AsyncBaseTransport):
    """`FastTransport`, or `HttpcoreTransport` over `shards` pools when `USE_HTTPCORE` is set."""

    def __init__(self, *, shards: int, max_connections: int, keepalive_expiry: float) -> None:
        self._inner: httpx.AsyncBaseTransport
        if USE_HTTPCORE:
            self._inner = HttpcoreTransport(
                shards=shards, max_connections=max_connections, keepalive_expiry=keepalive_expiry
            )
        else:
            self._inner = FastTransport(max_connections=max_connections, keepalive_expiry=keepalive_expiry)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


# The name the backend imports; it will go once `ollama.py` imports `UpstreamTransport`.
ShardedTransport = UpstreamTransport


class HttpcoreTransport(httpx.AsyncBaseTransport):
    def __init__(self, *, shards: int, max_connections: int, keepalive_expiry: float) -> None:
        self._per_shard = max(1, max_connections // shards)
        self._keepalive_s = keepalive_expiry
        self._backend = LoopBackend()
        # Built on first use: a backend that never sees concurrency never pays for 32 pools.
        self._shards: list[httpx.AsyncHTTPTransport | None] = [None] * shards
        self._turn = itertools.cycle(range(shards)).__next__

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        index = self._turn()
        shard = self._shards[index]
        if shard is None:
            shard = self._shards[index] = self._shard()
        return await shard.handle_async_request(request)

    def _shard(self) -> httpx.AsyncHTTPTransport:
        shard = httpx.AsyncHTTPTransport(verify=_tls())
        # httpx takes no network backend, so the pool it built is swapped for one on ours;
        # httpx's request conversion and exception mapping around it stay as they are.
        # Keep-alive limit = connection limit: httpcore closes idle connections once the pool
        # holds more than this many connections in all (busy ones included), which would churn.
        shard._pool = httpcore.AsyncConnectionPool(
            ssl_context=_tls(),
            max_connections=self._per_shard,
            max_keepalive_connections=self._per_shard,
            keepalive_expiry=self._keepalive_s,
            network_backend=self._backend,
        )
        return shard

    async def aclose(self) -> None:
        for shard in self._shards:
            if shard is not None:
                await shard.aclose()


@functools.cache
def _tls() -> ssl.SSLContext:
    # Loading the CA bundle takes ~50 ms: once per process, not once per pool.
    return httpx.create_ssl_context()
