"""The marks of forwarded requests in a session's meta, against a real redis-server: a node marks
a request for the home it forwards to, the home takes it before running it, a survivor ends the
taken ones of a dead home and leaves the untaken ones to their forwarder, who alone can take
those back, and when that forwarder dies too, its untaken marks end once, racing the home's take
(`server.cluster.homes`, `server.cluster.scripts`)."""

from __future__ import annotations

import orjson
from redis.commands.core import AsyncScript

from server.cluster import homes
from server.cluster.redis import RedisStore
from server.cluster.scripts import MARK, ORPHAN, TAKE, UNMARK, log_key, meta_key, node_marks_key

SID = "s_marks"


async def _session(store: RedisStore, home: str) -> None:
    await homes.create(store, SID, key_id="k", node_id=home, ttl_ms=60_000)


def _scripts(store: RedisStore) -> tuple[AsyncScript, AsyncScript, AsyncScript]:
    client = store.client
    return client.register_script(MARK), client.register_script(TAKE), client.register_script(UNMARK)


async def _marks(store: RedisStore) -> dict[str, str]:
    meta = await store.client.hgetall(meta_key(SID))
    return {k.decode()[2:]: v.decode() for k, v in meta.items() if k.startswith(b"r:")}


async def test_a_mark_is_made_only_for_the_home_and_never_over_a_request_in_flight(store: RedisStore) -> None:
    mark, _, _ = _scripts(store)
    await _session(store, "n_home")
    assert await homes.mark(store, mark, SID, "n_other", "f1", ["g1"], ttl_ms=60_000) is None
    assert await _marks(store) == {}
    await store.client.hset(meta_key(SID), "r:g0", "1")  # g0 runs at the home
    assert await homes.mark(store, mark, SID, "n_home", "f1", ["g0", "g1"], ttl_ms=60_000) == [False, True]
    assert await _marks(store) == {"g0": "1", "g1": "f1"}


async def test_the_home_takes_a_mark_and_then_its_forwarder_cannot_take_it_back(store: RedisStore) -> None:
    mark, take, unmark = _scripts(store)
    await _session(store, "n_home")
    await homes.mark(store, mark, SID, "n_home", "f1", ["g1", "g2"], ttl_ms=60_000)
    assert not await homes.take(store, take, SID, "n_other", "f1", ["g1"])
    assert await homes.take(store, take, SID, "n_home", "f1", ["g1"])
    assert await homes.take(store, take, SID, "n_home", "f9", ["g2"])
    assert await _marks(store) == {"g1": "1", "g2": "f1"}  # another forward's id takes nothing
    assert await homes.unmark(store, unmark, SID, "f1", ["g1", "g2"]) == [False, True]
    assert await _marks(store) == {"g1": "1"}
    assert await homes.unmark(store, unmark, SID, "1", ["g1"]) == [True]
    assert await _marks(store) == {}


async def test_a_survivor_ends_what_the_dead_home_took_and_leaves_what_it_never_took(
    store: RedisStore,
) -> None:
    mark, take, unmark = _scripts(store)
    await _session(store, "n_dead")
    await homes.mark(store, mark, SID, "n_dead", "f1", ["taken", "untaken"], ttl_ms=60_000)
    await homes.take(store, take, SID, "n_dead", "f1", ["taken"])
    await homes.recover(store, SID, "n_dead", ttl_ms=60_000)
    entries = await store.client.xrange(log_key(SID))
    ended = [orjson.loads(fields[b"m"]) for _, fields in entries]
    assert [(e["type"], e["id"], e["code"], e["retryable"], e["seq"]) for e in ended] == [
        ("error", "taken", "internal", True, 1)
    ]
    assert await store.client.hget(meta_key(SID), "home") == b""
    assert await _marks(store) == {"untaken": "f1"}
    # Its forwarder takes it back (to run it at the next home), once.
    assert await homes.unmark(store, unmark, SID, "f1", ["untaken"]) == [True]
    assert await homes.unmark(store, unmark, SID, "f1", ["untaken"]) == [False]
    # A second recovery of the same dead home ends nothing more.
    await homes.recover(store, SID, "n_dead", ttl_ms=60_000)
    assert len(await store.client.xrange(log_key(SID))) == 1


async def test_a_dead_forwarders_untaken_marks_become_the_homes_and_are_never_taken_after(
    store: RedisStore,
) -> None:
    mark, take, _ = _scripts(store)
    orphan = store.client.register_script(ORPHAN)
    await _session(store, "n_home")
    await homes.mark(store, mark, SID, "n_home", "n_fw/f1", ["taken", "untaken"], ttl_ms=60_000)
    await homes.mark(store, mark, SID, "n_home", "n_live/f2", ["other"], ttl_ms=60_000)
    assert await store.client.zrange(node_marks_key("n_fw"), 0, -1) == [SID.encode()]
    assert await homes.take(store, take, SID, "n_home", "n_fw/f1", ["taken"]) == [True]
    assert await homes.orphan(store, orphan, SID, "n_other", "n_fw") is None  # not the home
    assert await homes.orphan(store, orphan, SID, "n_home", "n_fw") == ["untaken"]
    assert await _marks(store) == {"taken": "1", "untaken": "1", "other": "n_live/f2"}
    # The dead forwarder's forward, arriving late, takes nothing: the home must not run it.
    assert await homes.take(store, take, SID, "n_home", "n_fw/f1", ["untaken"]) == [False]
    assert await homes.orphan(store, orphan, SID, "n_home", "n_fw") == []


async def test_a_dead_forwarders_untaken_marks_in_a_session_without_a_home_end_in_its_log(
    store: RedisStore,
) -> None:
    mark, _, _ = _scripts(store)
    await _session(store, "n_home")
    await homes.mark(store, mark, SID, "n_home", "n_fw/f1", ["g1"], ttl_ms=60_000)
    await homes.mark(store, mark, SID, "n_home", "n_live/f2", ["g2"], ttl_ms=60_000)
    await store.client.hset(meta_key(SID), "home", "")  # the home let go meanwhile
    told: list[str] = []

    async def alive(node: str) -> bool:
        return False

    async def tell(home: str, session_id: str) -> bool:
        told.append(home)
        return True

    await homes.end_untaken(store, "n_fw", alive=alive, tell=tell, ttl_ms=60_000)
    entries = await store.client.xrange(log_key(SID))
    ended = [orjson.loads(fields[b"m"]) for _, fields in entries]
    assert [(e["type"], e["id"], e["code"], e["retryable"], e["seq"]) for e in ended] == [
        ("error", "g1", "internal", True, 1)
    ]
    assert told == [] and await _marks(store) == {"g2": "n_live/f2"}
    assert await store.client.exists(node_marks_key("n_fw")) == 0
    # Once: a second reaping of the same session finds nothing left to end.
    await store.client.zadd(node_marks_key("n_fw"), {SID: 1.0})
    await homes.end_untaken(store, "n_fw", alive=alive, tell=tell, ttl_ms=60_000)
    assert len(await store.client.xrange(log_key(SID))) == 1
