"""This process as one node of the cluster: its id, its heartbeat, its subscriptions, its messages.

A `Node` has an id (``SLUICE_NODE_ID``, or random per process) and keeps a lease in Redis: the
key ``sluice:node:<id>`` with a TTL of `LEASE_S`, renewed every `BEAT_S`, and its score in the
``sluice:nodes`` sorted set. Every node looks for nodes whose score is older than the lease; the
first to lock one (``SET NX``) hands it to `on_dead`, which ends that node's unfinished requests,
then forgets it. So a killed node's requests end within ``LEASE_S + BEAT_S`` plus the work.

One pub/sub connection carries everything a node listens to: its control channel (messages other
nodes send it with `send`, or `call` when they wait for an answer), its feed channel (the live
events and notices of every session whose transport it holds, many sessions to a payload: handed
to `on_feed`) and any other channel (`subscribe`: the handler gets each published payload, in
order, only after the subscription is confirmed). When that connection drops and comes back,
redis-py subscribes again and `on_reconnect` runs, so whoever missed payloads re-reads the log.
Reading blocks until the next reply (no timer per message); instead each heartbeat pings that
connection, and one that heard nothing, not even a pong, for a lease is cut and connects again.

This module moves bytes and dicts; what they mean is `server.cluster.sessions`'s business.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from protocol.errors import SluiceError
from server.cluster.redis import RedisStore, raise_if_cancelled, store_unavailable
from server.cluster.scripts import NODES, control_channel, node_feed_channel, node_key

__all__ = ["BEAT_S", "CALL_TIMEOUT_S", "LEASE_S", "Node", "NotListening", "new_node_id"]

log = logging.getLogger("sluice.cluster.node")

LEASE_S = 5.0
BEAT_S = 1.0
# How long a `call` waits for the other node's answer.
CALL_TIMEOUT_S = 5.0

FeedHandler = Callable[[bytes], None]


class NotListening(SluiceError):
    """`Node.call` found nobody listening on the other node's control channel: the message
    reached no one (unlike a call that timed out, which it may have)."""

    def __init__(self) -> None:
        error = store_unavailable()
        super().__init__(error.code, error.message, retry_after_ms=error.retry_after_ms)


def new_node_id() -> str:
    return "n_" + secrets.token_hex(6)


class Node:
    """See the module docstring."""

    def __init__(
        self, store: RedisStore, node_id: str = "", *, lease_s: float = LEASE_S, beat_s: float = BEAT_S
    ) -> None:
        self.store = store
        self.id = node_id or new_node_id()
        self.lease_s = lease_s
        self.beat_s = beat_s
        self.channel = control_channel(self.id)
        self._channel_bytes = self.channel.encode()
        self._feed_bytes = node_feed_channel(self.id).encode()
        # A payload of this node's feed channel (`server.cluster.scripts` for its lines).
        self.on_feed: FeedHandler | None = None
        # A control message for this node (from `send`); returns the answer of a `call`, if any.
        self.on_control: Callable[[dict[str, Any]], Awaitable[object]] | None = None
        # A node whose lease expired, handed to this node to clean up after.
        self.on_dead: Callable[[str], Awaitable[None]] | None = None
        # The pub/sub connection came back: payloads may have been missed meanwhile.
        self.on_reconnect: Callable[[], None] | None = None
        self._pubsub: PubSub = store.client.pubsub()
        self._feeds: dict[bytes, FeedHandler] = {}
        self._confirming: dict[bytes, asyncio.Future[None]] = {}
        self._calls: dict[str, asyncio.Future[Any]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        # Control messages are handled one at a time, in the order they came (a cancel must not
        # overtake the request it cancels).
        self._inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._connected = False
        # When `_read` last heard anything on the pub/sub connection (loop time).
        self._heard = 0.0

    # -- life --------------------------------------------------------------------------------

    async def start(self) -> None:
        self._heard = asyncio.get_running_loop().time()
        self._tasks = [
            asyncio.create_task(self._read(), name="sluice node pubsub"),
            asyncio.create_task(self._beat(), name="sluice node heartbeat"),
            asyncio.create_task(self._work(), name="sluice node control"),
        ]
        with contextlib.suppress(SluiceError):
            await self._listen()

    async def _listen(self) -> None:
        for name in (self._channel_bytes, self._feed_bytes):
            if name not in self._pubsub.channels:
                await self._subscribe(name)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        with contextlib.suppress(RedisError, OSError):
            async with self.store.client.pipeline(transaction=False) as pipe:
                pipe.zrem(NODES, self.id)
                pipe.delete(node_key(self.id))
                await pipe.execute()
        with contextlib.suppress(RedisError, OSError):
            await self._pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _beat(self) -> None:
        while True:
            try:
                async with self.store.client.pipeline(transaction=False) as pipe:
                    pipe.set(node_key(self.id), "1", px=int(self.lease_s * 1000))
                    pipe.zadd(NODES, {self.id: time.time()})
                    await pipe.execute()
                await self._listen()
                await self._check_feed()
                await self._reap()
            except (RedisError, OSError) as exc:
                self.store.mark_down(type(exc).__name__)
            except SluiceError:
                pass  # the store is down; the next beat tries again
            except Exception:  # the heartbeat must outlive any one bad cleanup
                log.exception("cleaning up after a dead node failed")
            raise_if_cancelled()
            await asyncio.sleep(self.beat_s)

    async def _reap(self) -> None:
        client = self.store.client
        dead = await client.zrangebyscore(NODES, "-inf", time.time() - self.lease_s)
        for raw in dead:
            node_id = raw.decode() if isinstance(raw, bytes) else str(raw)
            if node_id == self.id or await client.exists(node_key(node_id)):
                continue
            if not await client.set(f"{node_key(node_id)}:reaper", self.id, nx=True, px=30_000):
                continue  # another node is on it
            log.warning("node %s stopped: ending its requests", node_id)
            if self.on_dead is not None:
                await self.on_dead(node_id)
            await client.zrem(NODES, node_id)

    async def alive(self, node_id: str) -> bool:
        """Whether ``node_id`` holds its lease."""
        return bool(await self.store.run(self.store.client.exists(node_key(node_id))))

    # -- subscriptions -----------------------------------------------------------------------

    async def subscribe(self, channel: str, handler: FeedHandler) -> None:
        """Deliver every payload published on ``channel`` from now on to ``handler``; returns once
        Redis confirmed the subscription (so nothing published after is missed)."""
        name = channel.encode()
        self._feeds[name] = handler
        try:
            await self._subscribe(name)
        except BaseException:
            self._feeds.pop(name, None)
            raise

    async def unsubscribe(self, channel: str) -> None:
        name = channel.encode()
        if self._feeds.pop(name, None) is not None:
            with contextlib.suppress(RedisError, OSError):
                await self._pubsub.unsubscribe(name)

    async def _subscribe(self, name: bytes) -> None:
        confirmed = self._confirming.get(name)
        if confirmed is None or confirmed.done():
            confirmed = self._confirming[name] = asyncio.get_running_loop().create_future()
        async with self.store.translated():
            await self._pubsub.subscribe(name)
        try:
            async with asyncio.timeout(CALL_TIMEOUT_S):
                await asyncio.shield(confirmed)
        except TimeoutError:
            raise store_unavailable() from None

    async def _read(self) -> None:
        pubsub = self._pubsub
        loop = asyncio.get_running_loop()
        while True:
            try:
                if not pubsub.subscribed:
                    await asyncio.sleep(0.05)
                    continue
                # Blocks until the next reply, with no timer per message: a connection that fails
                # raises here, one that goes silent is cut by the heartbeat (`_check_feed`).
                response = await pubsub.parse_response(block=True)
            except (RedisError, OSError) as exc:
                raise_if_cancelled()
                self._connected = False
                self.store.mark_down(type(exc).__name__)
                await asyncio.sleep(0.2)
                continue
            self._heard = loop.time()
            if response is None:
                continue
            if not self._connected:
                self._connected = True
                if self.on_reconnect is not None:
                    self.on_reconnect()
            try:
                if isinstance(response, list) and len(response) == 3 and response[0] == b"message":
                    self._published(response[1], response[2])  # the hot path: a payload
                else:  # confirmations and pongs: redis-py keeps its subscription state from them
                    message = await pubsub.handle_message(response)  # type: ignore[no-untyped-call]
                    if message is not None:
                        self._dispatch(message)
            except Exception:  # one bad payload must not stop the node listening
                log.exception("handling a published message failed")

    async def _check_feed(self) -> None:
        """Ask the pub/sub connection for a pong (read by `_read`); one that heard nothing, not
        even the last beat's pong, for a lease is cut, so `_read` fails and connects again."""
        pubsub = self._pubsub
        if not pubsub.subscribed or pubsub.connection is None:
            return
        if not self._connected:
            return  # `_read` is connecting again already
        if asyncio.get_running_loop().time() - self._heard > self.lease_s:
            log.warning("pub/sub connection silent for %.1f s: reconnecting", self.lease_s)
            self._heard = asyncio.get_running_loop().time()
            self._connected = False
            await pubsub.connection.disconnect()
            return
        await pubsub.ping()

    def _dispatch(self, message: dict[str, Any]) -> None:
        kind, channel = message["type"], message["channel"]
        if kind == "subscribe":
            confirmed = self._confirming.pop(channel, None)
            if confirmed is not None and not confirmed.done():
                confirmed.set_result(None)
            return
        if kind == "message":
            self._published(channel, message["data"])

    def _published(self, channel: bytes, data: bytes) -> None:
        if channel == self._channel_bytes:
            self._control(orjson.loads(data))
            return
        handler = self.on_feed if channel == self._feed_bytes else self._feeds.get(channel)
        if handler is not None:
            handler(data)

    # -- control messages --------------------------------------------------------------------

    async def send(self, node_id: str, message: dict[str, Any]) -> bool:
        """Publish ``message`` on ``node_id``'s control channel; whether that node is listening."""
        payload = orjson.dumps(message)
        listeners = await self.store.run(self.store.client.publish(control_channel(node_id), payload))
        return bool(listeners)

    async def call(self, node_id: str, message: dict[str, Any], *, within_s: float = CALL_TIMEOUT_S) -> Any:
        """`send` and wait for the answer `on_control` returned there; `NotListening` when the
        node is not listening, `store_unavailable` when it does not answer within ``within_s``."""
        call_id = secrets.token_hex(8)
        answer = self._calls[call_id] = asyncio.get_running_loop().create_future()
        try:
            if not await self.send(node_id, {**message, "call": call_id, "from": self.id}):
                raise NotListening()
            async with asyncio.timeout(within_s):
                return await answer
        except TimeoutError:
            raise store_unavailable() from None
        finally:
            self._calls.pop(call_id, None)

    def _control(self, message: dict[str, Any]) -> None:
        if message.get("op") == "answer":
            answer = self._calls.get(message["call"])
            if answer is not None and not answer.done():
                answer.set_result(message.get("body"))
            return
        self._inbox.put_nowait(message)

    async def _work(self) -> None:
        while True:
            await self._answer(await self._inbox.get())

    async def _answer(self, message: dict[str, Any]) -> None:
        if self.on_control is None:
            return
        try:
            body = await self.on_control(message)
        except Exception:
            log.exception("handling a control message failed")
            body = None
        if "call" in message:
            with contextlib.suppress(SluiceError):
                await self.send(message["from"], {"op": "answer", "call": message["call"], "body": body})
