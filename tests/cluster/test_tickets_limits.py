"""Shared state across nodes, against a real redis-server: a ticket issued by any node works once,
on any node (no setting beyond SLUICE_REDIS_URL); requests, tokens and sessions per key are
counted across nodes. Nodes here are separate in-process `Authenticator`s, `RateLimiter`s and
apps on one Redis."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator

import pytest
from fastapi.testclient import TestClient

from protocol.errors import ErrorCode, SluiceError
from server.app import create_app
from server.auth import Authenticator, Principal
from server.ratelimit import RateLimiter
from server.settings import Settings
from server.tickets import TicketBook, cluster_ticket_secret
from tests.server.fakes import FakeRegistry, ScriptedGenerator
from tests.support.redis_server import RedisServer

KEY = "sk-cluster-0123456789"
OTHER_KEY = "sk-cluster-other-987654"
KEY_ID = hashlib.sha256(KEY.encode()).hexdigest()[:12]


@pytest.fixture
def redis(redis_server: RedisServer) -> RedisServer:
    if not redis_server.running:
        redis_server.start()
    redis_server.command("FLUSHALL")
    return redis_server


def node_auth(redis: RedisServer, keys: list[str] | None = None) -> Authenticator:
    return Authenticator(
        Settings(redis_url=redis.url, api_keys=keys if keys is not None else [KEY, OTHER_KEY])
    )


def refused(code: ErrorCode, call: object) -> SluiceError:
    assert callable(call)
    with pytest.raises(SluiceError) as caught:
        call()
    assert caught.value.code is code
    return caught.value


# -- tickets ---------------------------------------------------------------------------------


def test_a_ticket_issued_on_one_node_works_once_on_any_node(redis: RedisServer) -> None:
    node_a, node_b = node_auth(redis), node_auth(redis, [OTHER_KEY, KEY, KEY])  # same keys, any order
    ticket, ttl = node_a.issue_ticket(Principal(KEY_ID))
    assert ttl == 60
    assert node_b.authenticate(ticket=ticket) == Principal(KEY_ID)
    refused(ErrorCode.UNAUTHORIZED, lambda: node_a.authenticate(ticket=ticket))
    refused(ErrorCode.UNAUTHORIZED, lambda: node_b.authenticate(ticket=ticket))
    # The nonce is in Redis, expiring with the ticket.
    nonces = redis.command("KEYS", "sluice:ticket:*")
    assert isinstance(nonces, list) and len(nonces) == 1
    pttl = redis.command("PTTL", nonces[0])
    assert isinstance(pttl, int) and 0 < pttl <= 60_000
    # A node configured with other keys signs with another secret: its tickets are not ours.
    stranger = node_auth(redis, [KEY])
    foreign, _ = stranger.issue_ticket(Principal(KEY_ID))
    refused(ErrorCode.UNAUTHORIZED, lambda: node_a.authenticate(ticket=foreign))


def test_the_shared_secret_is_derived_alike_or_taken_from_the_setting(redis: RedisServer) -> None:
    assert cluster_ticket_secret([KEY, OTHER_KEY]) == cluster_ticket_secret([OTHER_KEY, KEY, KEY])
    assert cluster_ticket_secret([KEY]) != cluster_ticket_secret([OTHER_KEY])
    assert KEY not in cluster_ticket_secret([KEY])
    explicit = Settings(redis_url=redis.url, api_keys=[KEY], ticket_secret="s3cret")
    other_keys = Settings(redis_url=redis.url, api_keys=[OTHER_KEY], ticket_secret="s3cret")
    ticket = TicketBook.from_settings(explicit).issue("k")
    assert TicketBook.from_settings(other_keys).verify(ticket).key_id == "k"
    # One node alone keeps its nonces in memory, as before: no Redis is touched.
    local = TicketBook.from_settings(Settings(api_keys=[KEY]))
    local.verify(local.issue("k"))
    assert local.used_count == 1


def test_while_redis_is_down_tickets_are_refused_retryably_without_stalling(redis: RedisServer) -> None:
    node = node_auth(redis)
    ticket, _ = node.issue_ticket(Principal(KEY_ID))
    later, _ = node.issue_ticket(Principal(KEY_ID))
    redis.stop()
    started = time.monotonic()
    error = refused(ErrorCode.UPSTREAM_UNAVAILABLE, lambda: node.authenticate(ticket=ticket))
    assert error.retryable and error.retry_after_ms
    refused(ErrorCode.UPSTREAM_UNAVAILABLE, lambda: node.authenticate(ticket=ticket))  # backing off
    assert time.monotonic() - started < 1.0
    redis.start()
    time.sleep(1.1)  # the back-off after a failure
    assert node.authenticate(ticket=ticket) == Principal(KEY_ID)  # unspent: it never reached Redis
    assert node.authenticate(ticket=later) == Principal(KEY_ID)


def test_a_ticket_from_one_app_opens_a_websocket_on_another_once(redis: RedisServer) -> None:
    settings = Settings(redis_url=redis.url, api_keys=[KEY])
    with (
        TestClient(create_app(settings, registry=FakeRegistry())) as node_a,
        TestClient(create_app(settings, registry=FakeRegistry())) as node_b,
    ):
        issued = node_a.post("/v1/tickets", headers={"Authorization": f"Bearer {KEY}"})
        assert issued.status_code == 200
        ticket = issued.json()["ticket"]
        with node_b.websocket_connect(f"/v1/ws?ticket={ticket}", subprotocols=["sluice.v1"]) as ws:
            ws.send_text('{"type":"hello","protocol":1}')
            assert ws.receive_json()["type"] == "welcome"
        for node in (node_a, node_b):
            with (
                pytest.raises(Exception),  # noqa: B017  the handshake is refused (closed before accept)
                node.websocket_connect(f"/v1/ws?ticket={ticket}", subprotocols=["sluice.v1"]) as ws,
            ):
                ws.send_text('{"type":"hello","protocol":1}')
                ws.receive_json()


# -- limits ----------------------------------------------------------------------------------


@pytest.fixture
async def limiters(redis: RedisServer) -> AsyncIterator[list[RateLimiter]]:
    """The limiters a test made (`two_nodes` adds to it), closed after it."""
    made: list[RateLimiter] = []
    yield made
    for limiter in made:
        await limiter.close()


def two_nodes(redis: RedisServer, made: list[RateLimiter], **limits: int) -> tuple[RateLimiter, RateLimiter]:
    nodes = tuple(RateLimiter(Settings(redis_url=redis.url, **limits)) for _ in range(2))  # type: ignore[arg-type]
    made.extend(nodes)
    assert nodes[0].shared is not None and nodes[1].shared is not None
    assert nodes[0].shared.node_id != nodes[1].shared.node_id
    return nodes[0], nodes[1]


async def sync(*nodes: RateLimiter) -> None:
    for node in nodes:
        assert node.shared is not None
        await node.shared.sync()


async def test_requests_per_minute_are_counted_across_nodes(
    redis: RedisServer, limiters: list[RateLimiter]
) -> None:
    a, b = two_nodes(redis, limiters, requests_per_minute=4)
    a.check_request("k")
    a.check_request("k")
    await sync(a)
    b.check_request("k")  # a key new to b: counted by b alone until b's first sync of it
    await sync(b)
    b.check_request("k")
    error = refused(ErrorCode.RATE_LIMITED, lambda: b.check_request("k"))  # 4 in the cluster
    assert error.retry_after_ms and 0 < error.retry_after_ms <= 60_000
    await sync(b, a)
    refused(ErrorCode.RATE_LIMITED, lambda: a.check_request("k"))
    a.check_request("other")  # per key
    # Alone, each node would have allowed 4: the limit is the cluster's, not a node's.


async def test_the_background_sync_shares_counts_by_itself(
    redis: RedisServer, limiters: list[RateLimiter]
) -> None:
    a, b = two_nodes(redis, limiters, requests_per_minute=3)
    a.check_request("k")
    a.check_request("k")
    b.check_request("k")  # b starts syncing this key (the task starts on first use)
    assert a.shared is not None and b.shared is not None
    # Nobody calls sync here: only the nodes' own sync tasks can bring a's two hits into b's view
    # (a 50 ms interval; waited for, since a busy 2-core machine can delay them well past it).
    for _ in range(400):
        if b.shared.view("k").requests_left == 0:
            break
        await asyncio.sleep(0.05)
    refused(ErrorCode.RATE_LIMITED, lambda: b.check_request("k"))
    assert a.shared.syncs > 0


async def test_tokens_per_minute_are_counted_across_nodes(
    redis: RedisServer, limiters: list[RateLimiter]
) -> None:
    a, b = two_nodes(redis, limiters, tokens_per_minute=100)
    a.check_request("k")
    a.consume_tokens("k", 100)
    b.check_request("k")  # b has heard nothing yet
    await sync(a, b)
    error = refused(ErrorCode.RATE_LIMITED, lambda: b.check_request("k"))
    assert "tokens" in error.message


async def test_sessions_per_key_are_counted_across_nodes(
    redis: RedisServer, limiters: list[RateLimiter]
) -> None:
    a, b = two_nodes(redis, limiters, sessions_per_key=2)
    a.acquire_session("k")
    b.acquire_session("k")
    await sync(a, b)
    await sync(a, b)  # each has published, then read the other's
    refused(ErrorCode.RATE_LIMITED, lambda: a.acquire_session("k"))
    refused(ErrorCode.RATE_LIMITED, lambda: b.acquire_session("k"))
    b.release_session("k")
    await sync(b, a)
    a.acquire_session("k")
    # A session opened on a and ended on b (it moved) leaves the cluster's sum right.
    b.release_session("k")
    await sync(b, a)
    a.acquire_session("k")
    await sync(a, b)
    refused(ErrorCode.RATE_LIMITED, lambda: b.acquire_session("k"))


async def test_while_redis_is_down_limits_stay_local_and_catch_up_after(
    redis: RedisServer, limiters: list[RateLimiter]
) -> None:
    a, b = two_nodes(redis, limiters, requests_per_minute=5)
    await sync(a, b)
    redis.stop()
    a.check_request("k")
    a.check_request("k")  # decided locally, no error, no wait
    with pytest.raises(Exception):  # noqa: B017  a sync fails while Redis is down (redis-py's error)
        await sync(a)
    redis.start()
    await sync(a)  # the pending hits reach Redis once it is back
    b.check_request("k")
    await sync(b)
    b.check_request("k")
    b.check_request("k")
    refused(ErrorCode.RATE_LIMITED, lambda: b.check_request("k"))


async def test_one_node_without_redis_counts_alone() -> None:
    limiter = RateLimiter(Settings(requests_per_minute=1))
    assert limiter.shared is None
    limiter.check_request("k")
    refused(ErrorCode.RATE_LIMITED, lambda: limiter.check_request("k"))
    await limiter.close()


def test_a_per_key_rate_limit_shared_by_two_apps(redis: RedisServer) -> None:
    settings = Settings(redis_url=redis.url, requests_per_minute=3)
    statuses: list[int] = []
    with (
        TestClient(create_app(settings, registry=FakeRegistry(ScriptedGenerator(pieces=["x"])))) as node_a,
        TestClient(create_app(settings, registry=FakeRegistry(ScriptedGenerator(pieces=["x"])))) as node_b,
    ):
        for n in range(4):
            response = (node_a, node_b)[n % 2].post("/api/v1/generate", json={"prompt": "hi"})
            statuses.append(response.status_code)
            time.sleep(0.3)  # more than a sync interval: the other node has heard
    assert statuses == [200, 200, 200, 429]


async def test_a_dead_nodes_sessions_stop_counting_by_themselves(
    redis: RedisServer, limiters: list[RateLimiter], monkeypatch: pytest.MonkeyPatch
) -> None:
    from server import sharedlimits

    monkeypatch.setattr(sharedlimits, "_NODE_TTL_S", 1.0)
    a, b = two_nodes(redis, limiters, sessions_per_key=2)
    a.acquire_session("k")
    a.acquire_session("k")
    await sync(a, b)
    refused(ErrorCode.RATE_LIMITED, lambda: b.acquire_session("k"))
    assert a.shared is not None
    await a.shared.close()  # a stops syncing, as a killed node would: its count expires in Redis
    await asyncio.sleep(1.3)
    await sync(b)
    b.acquire_session("k")
