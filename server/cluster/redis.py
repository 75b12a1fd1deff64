"""The one Redis connection pool of a cluster-mode node, its health, and the scripts it runs.

`RedisStore` owns the redis-py asyncio client (hiredis parses replies when installed, which the
``redis[hiredis]`` dependency makes sure of), registers the Lua scripts of `server.cluster.scripts`
once, keeps one more connection of its own for the hot path (`round_trip`: commands the caller
packed with `pack`, written at once, their replies parsed by hiredis as they arrive: redis-py
connects it (auth, database, TLS) and then hands its transport to `_Link`, so a round trip costs
no per-command or per-read work of redis-py's and no timer of its own), and watches the server with a PING every `HEALTH_EVERY_S`: `healthy` is the one answer to
"can this node do cluster work now", read by ``/ready`` and by everything that would start new
work. Redis's exceptions become `SluiceError` ``upstream_unavailable`` (retryable) here and only
here (`translated`), so callers never see a foreign exception.

This module must never hold session state: that is `server.cluster.eventlog` and
`server.cluster.sessions`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterable
from typing import Any

import hiredis
from redis._parsers.base import BaseParser
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection, BlockingConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from protocol.errors import ErrorCode, SluiceError
from server.cluster.scripts import APPEND, CLAIM, END

__all__ = ["HEALTH_EVERY_S", "RedisStore", "bulk", "pack", "raise_if_cancelled", "store_unavailable"]

log = logging.getLogger("sluice.cluster.redis")

HEALTH_EVERY_S = 0.5
# A command that takes longer than this counts as Redis being unreachable.
_SOCKET_TIMEOUT_S = 2.0
# Connections to Redis this node's commands share (the log writer has one more of its own).
_MAX_CONNECTIONS = 64


def raise_if_cancelled() -> None:
    """Raise `CancelledError` if this task was cancelled and the cancel was not taken back.

    Every loop here that outlives one Redis failure (catching `RedisError`/`OSError` and going on)
    calls this before its next turn: a cancel that lands while a command is under way can come out
    of redis-py as its own connection or timeout error (on Python 3.11 `TimeoutError` is an
    `OSError`), and a loop that took it for one more failure would never stop, so whoever awaits
    the cancelled task (a node closing) would wait forever. `asyncio.timeout` takes back the
    cancels it raised itself, so only a cancel from outside counts here."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def bulk(arg: bytes) -> bytes:
    """One RESP bulk string."""
    return b"$%d\r\n%b\r\n" % (len(arg), arg)


def pack(count: int, parts: Iterable[bytes]) -> bytes:
    """One RESP command of ``count`` arguments, from their `bulk` strings (some may be joined)."""
    return b"*%d\r\n%b" % (count, b"".join(parts))


def store_unavailable() -> SluiceError:
    """The error new work gets while the session store cannot be reached."""
    return SluiceError(
        ErrorCode.UPSTREAM_UNAVAILABLE, "the session store (Redis) is unreachable", retry_after_ms=1000
    )


class RedisStore:
    """A Redis server shared by every node of the cluster, seen from this node."""

    def __init__(self, url: str, *, client: Redis | None = None) -> None:
        self.url = url
        self.client: Redis = (
            client
            if client is not None
            else Redis.from_pool(
                # A burst of new sessions waits for a free connection (up to the socket timeout)
                # instead of failing as if Redis were down.
                BlockingConnectionPool.from_url(
                    url,
                    max_connections=_MAX_CONNECTIONS,
                    timeout=_SOCKET_TIMEOUT_S,
                    socket_timeout=_SOCKET_TIMEOUT_S,
                    socket_connect_timeout=_SOCKET_TIMEOUT_S,
                    health_check_interval=0,
                    # A pooled connection the server closed (a restart) fails once: try a fresh
                    # one. Every write is safe to repeat (the scripts detect a replayed batch).
                    retry=Retry(ExponentialBackoff(cap=0.1, base=0.01), 2),
                    retry_on_error=[RedisConnectionError, RedisTimeoutError],
                )
            )
        )
        self.append_script = self.client.register_script(APPEND)
        self.claim_script = self.client.register_script(CLAIM)
        self.end_script = self.client.register_script(END)
        self._healthy = False
        self._reason = "not checked yet"
        self._watcher: asyncio.Task[None] | None = None
        self._link: _Link | None = None

    # -- health ------------------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        return self._healthy

    def status(self) -> dict[str, object]:
        """What ``/ready`` reports about the store."""
        body: dict[str, object] = {"reachable": self._healthy}
        if not self._healthy:
            body["error"] = self._reason
        return body

    def check(self) -> None:
        """Raise `store_unavailable` unless the store answered its last check."""
        if not self._healthy:
            raise store_unavailable()

    def mark_down(self, reason: str) -> None:
        if self._healthy:
            log.warning("redis unreachable: %s", reason)
        self._healthy = False
        self._reason = reason

    async def ping(self) -> bool:
        """Check the server now; whether it answered."""
        try:
            await self.client.ping()
        except (RedisError, OSError) as exc:
            self.mark_down(type(exc).__name__)
            return False
        if not self._healthy:
            # Back (or first seen): a restarted server has an empty script cache.
            try:
                await self.load_scripts()
            except SluiceError:
                return False
            log.info("redis reachable")
        self._healthy = True
        self._reason = ""
        return True

    async def start(self) -> None:
        """Check once, then keep checking in the background."""
        await self.ping()
        if self._watcher is None:
            self._watcher = asyncio.create_task(self._watch(), name="sluice redis health")

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(HEALTH_EVERY_S)
            await self.ping()
            raise_if_cancelled()

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
        if self._link is not None:
            self._link.drop()
            self._link = None
        await self.client.aclose()

    # -- commands ----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def translated(self) -> AsyncIterator[None]:
        """Run Redis commands; a Redis failure becomes `store_unavailable` (and marks the store
        down until the next successful check)."""
        try:
            yield
        except (RedisError, OSError) as exc:
            self.mark_down(type(exc).__name__)
            raise store_unavailable() from None

    async def load_scripts(self) -> None:
        """Load the scripts into the server's cache (after a restart emptied it)."""
        async with self.translated():
            for script in (self.append_script, self.claim_script, self.end_script):
                script.sha = await self.client.script_load(script.script)

    async def round_trip(self, commands: list[bytes]) -> list[Any]:
        """Send ``commands`` (each made by `pack`) in one write on this store's own connection
        and read their replies, in order; a command Redis refused gives its `ResponseError` in
        its place. Raises `RedisError`, `OSError` or `TimeoutError` (the whole round trip is
        bounded by one timeout) when the connection failed: then nothing is known of what ran,
        and the next round trip opens a new connection."""
        link = self._link
        if link is None or link.lost:
            pool = self.client.connection_pool
            # redis-py connects (and authenticates); then the link reads the socket itself.
            conn: AbstractConnection = pool.connection_class(**pool.connection_kwargs)
            async with asyncio.timeout(_SOCKET_TIMEOUT_S):
                await conn.connect()  # type: ignore[no-untyped-call]
            writer = conn._writer
            if writer is None:  # pragma: no cover - connect() either sets it or raises
                raise RedisConnectionError("no connection")
            # The link owns the socket now: redis-py must not close it (it would, on collecting
            # a connection that still names its streams), and the link keeps the stream writer,
            # which would too, on being collected.
            conn._writer = conn._reader = None
            link = self._link = _Link(writer)
        return await link.round_trip(commands)

    async def run(self, coro: Any) -> Any:
        """Await one redis-py call through `translated`."""
        async with self.translated():
            return await coro


class _Link(asyncio.Protocol):
    """The hot path's connection once connected: the transport's protocol from then on. One
    round trip at a time (the log writer's); its replies are parsed by hiredis as they arrive,
    and it completes as the last one does. One timer watches every round trip (re-armed only
    when it fires while one is in flight), not one timer per round trip."""

    def __init__(self, stream: asyncio.StreamWriter) -> None:
        self._stream = stream
        self._transport = transport = stream.transport
        self._parser = hiredis.Reader(protocolError=InvalidResponse, replyError=BaseParser.parse_error)
        self._replies: list[Any] = []
        self._expected = 0
        self._future: asyncio.Future[list[Any]] | None = None
        self._since = 0.0
        self._watch: asyncio.TimerHandle | None = None
        self.lost = False
        transport.set_protocol(self)

    async def round_trip(self, commands: list[bytes]) -> list[Any]:
        loop = asyncio.get_running_loop()
        future = self._future = loop.create_future()
        self._replies, self._expected = [], len(commands)
        self._since = loop.time()
        if self._watch is None:
            self._watch = loop.call_later(_SOCKET_TIMEOUT_S, self._check)
        self._transport.write(b"".join(commands))
        try:
            replies: list[Any] = await future
        except BaseException:
            self.drop()  # a reply may still come: this connection is out of step now
            raise
        finally:
            self._future = None
        return replies

    def _check(self) -> None:
        self._watch = None
        future = self._future
        if future is None or future.done():
            return
        loop = future.get_loop()
        late = self._since + _SOCKET_TIMEOUT_S - loop.time()
        if late > 0:
            self._watch = loop.call_later(late, self._check)
        else:
            future.set_exception(TimeoutError("the session store did not answer in time"))

    def drop(self) -> None:
        self.lost = True
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        self._transport.abort()

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        parser.feed(data)
        try:
            reply = parser.gets()
            while reply is not False:
                self._replies.append(reply)
                reply = parser.gets()
        except InvalidResponse as exc:
            self._fail(exc)
            self.drop()
            return
        future = self._future
        if future is not None and len(self._replies) >= self._expected and not future.done():
            future.set_result(self._replies)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._fail(RedisConnectionError("the session store closed the connection"))

    def _fail(self, exc: Exception) -> None:
        future = self._future
        if future is not None and not future.done():
            future.set_exception(exc)
