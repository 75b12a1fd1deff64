"""The Redis-backed event log against a real redis-server: written through in pipelined batches,
read back exactly or not at all, refused when the store lost the session or another node took it."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from protocol.codec import encode
from protocol.errors import ErrorCode
from protocol.eventlog import LogBudget
from protocol.messages import Delta, Done, Error, Generate, LoggedMessage, Timings, Usage
from protocol.session import Session, SessionLimits
from server.cluster.eventlog import (
    WRITE_INTERVAL_S,
    WRITE_WINDOW_S,
    Framed,
    LogWriter,
    RedisEventLog,
    decode_event,
    framed,
    read_after,
)
from server.cluster.redis import RedisStore, bulk, pack
from server.cluster.scripts import log_key, meta_key, node_feed_channel, subs_key
from server.cluster.session import feed_runs
from tests.support.redis_server import RedisServer

NODE = "n_a"
SESSION = "s_test"


async def _create(store: RedisStore, session: str = SESSION, *, home: str = NODE) -> None:
    await store.client.hset(meta_key(session), mapping={"key": "k", "epoch": "e1", "seq": 0, "home": home})


def _log(
    writer: LogWriter, session: str = SESSION, *, capacity: int = 4096, max_bytes: int = 0
) -> RedisEventLog:
    return RedisEventLog(session, "e1", capacity=capacity, max_bytes=max_bytes, writer=writer)


def _deltas(first: int, count: int, request: str = "r1") -> list[Delta]:
    return [Delta(id=request, seq=seq, text=f"t{seq} ") for seq in range(first, first + count)]


def _writer(store: RedisStore) -> LogWriter:
    return LogWriter(store, NODE, ttl_ms=60_000)


def _calls(redis_server: RedisServer, command: str) -> int:
    info = redis_server.command("INFO", "commandstats")
    assert isinstance(info, bytes)
    for line in info.decode().splitlines():
        if line.startswith(f"cmdstat_{command}:"):
            return int(line.split("calls=")[1].split(",")[0])
    return 0


async def test_a_burst_of_events_is_one_round_trip_and_lands_with_seq_ids(
    store: RedisStore, redis_server: RedisServer
) -> None:
    await _create(store)
    writer = _writer(store)
    event_log = _log(writer)
    events = _deltas(1, 300)
    for event in events:  # all in one tick, as a fast stream's tokens are
        event_log.append(event)
    await writer.flush()
    assert writer.round_trips == 1
    assert _calls(redis_server, "evalsha") == 1
    entries = await store.client.xrange(log_key(SESSION))
    assert [entry_id for entry_id, _ in entries] == [f"{seq}-0".encode() for seq in range(1, 301)]
    assert [decode_event(fields[b"m"]) for _, fields in entries] == events
    assert await store.client.hget(meta_key(SESSION), "seq") == b"300"
    assert await read_after(store, SESSION, 250) == events[250:]
    assert await read_after(store, SESSION, 300) == []
    assert 0 < await store.client.pttl(log_key(SESSION)) <= 60_000  # the log began: it expires


async def test_every_session_that_changed_is_written_by_one_call_and_refused_alone(
    store: RedisStore, redis_server: RedisServer
) -> None:
    sessions = [f"s_{n}" for n in range(5)]
    for session in sessions:
        await _create(store, session)
    await store.client.hset(meta_key(sessions[2]), "home", "n_b")  # another node took this one
    writer = _writer(store)
    logs = [_log(writer, session) for session in sessions]
    lost: list[RedisEventLog] = []
    for event_log in logs:
        event_log.on_lost = lost.append
        for event in _deltas(1, 4):
            event_log.append(event)
    await writer.flush()
    assert writer.round_trips == 1 and _calls(redis_server, "evalsha") == 1
    assert lost == [logs[2]]
    for n, session in enumerate(sessions):
        assert await read_after(store, session, 0) == ([] if n == 2 else _deltas(1, 4))


async def test_an_ack_trims_the_stream_exactly_with_the_next_write(store: RedisStore) -> None:
    await _create(store)
    writer = _writer(store)
    event_log = _log(writer)
    for event in _deltas(1, 10):
        event_log.append(event)
    await writer.flush()
    event_log.trim(6)
    assert event_log.after(5) is None and event_log.after(6) == _deltas(7, 4)
    await writer.flush()
    assert (await store.client.xrange(log_key(SESSION)))[0][0] == b"7-0"
    assert await read_after(store, SESSION, 5) is None  # as the memory answers
    assert await read_after(store, SESSION, 6) == _deltas(7, 4)
    rounds = writer.round_trips
    event_log.trim(3)  # older than what was trimmed already: nothing to write
    await writer.flush()
    assert writer.round_trips == rounds


async def test_a_session_logs_a_delta_from_its_fields_and_the_home_sends_the_json_redis_logged(
    store: RedisStore,
) -> None:
    await _create(store)
    writer = _writer(store)
    event_log = _log(writer)
    written: list[LoggedMessage | Framed] = []
    event_log.on_written = written.extend
    session = Session(SESSION, SessionLimits(), event_log)
    session.receive(Generate(type="generate", id="r1", prompt="p"))
    texts = ("a", ' "q" ', "é\u2028")
    for text in texts:
        session.numbered_delta("r1", text)
    await writer.flush()
    expected = [Delta(id="r1", seq=seq, text=text) for seq, text in enumerate(texts, 1)]
    # Each delta reaches the home's transport as its frame, the same JSON Redis logged.
    assert written == [Framed(delta.seq, encode(delta)) for delta in expected]
    entries = await store.client.xrange(log_key(SESSION))
    assert [fields[b"m"].decode() for _, fields in entries] == [encode(delta) for delta in expected]
    assert event_log.after(0) == expected  # and the memory copy replays them as models


async def test_events_appended_while_a_write_is_in_flight_go_in_the_next_batch(store: RedisStore) -> None:
    await _create(store)
    writer = _writer(store)
    event_log = _log(writer)
    for round_ in range(5):
        for event in _deltas(round_ * 20 + 1, 20):
            event_log.append(event)
        await asyncio.sleep(WRITE_WINDOW_S * 3)  # past the window: a write starts meanwhile
    await writer.flush()
    assert 1 < writer.round_trips <= 5
    assert await read_after(store, SESSION, 0) == _deltas(1, 100)
    assert event_log.after(90) == _deltas(91, 10)


async def test_back_to_back_writes_start_at_least_the_write_interval_apart(store: RedisStore) -> None:
    await _create(store)
    writer = _writer(store)
    event_log = _log(writer)
    loop = asyncio.get_running_loop()
    started = loop.time()
    for seq in range(1, 201):  # a token every ~0.1 ms for ~20 ms: a write is always due
        event_log.append(Delta(id="r1", seq=seq, text="x"))
        await asyncio.sleep(0.0001)
    await writer.flush()
    elapsed = loop.time() - started
    assert 1 < writer.round_trips <= elapsed / WRITE_INTERVAL_S + 2
    assert await read_after(store, SESSION, 0) == [Delta(id="r1", seq=s, text="x") for s in range(1, 201)]


async def test_requests_in_flight_are_recorded_until_their_terminal_event(store: RedisStore) -> None:
    await _create(store)
    writer = _writer(store)
    event_log = _log(writer)
    event_log.started("r1")
    event_log.started("r2")
    event_log.append(Delta(id="r1", seq=1, text="a"))
    await writer.flush()
    meta = await store.client.hgetall(meta_key(SESSION))
    assert meta[b"r:r1"] == b"1" and meta[b"r:r2"] == b"1"
    usage, timings = Usage(prompt_tokens=1, completion_tokens=1), Timings(queue_ms=0, ttft_ms=1, total_ms=2)
    event_log.append(Done(id="r1", seq=2, finish_reason="stop", usage=usage, timings=timings, model="m"))
    event_log.append(Error(id="r2", seq=3, code=ErrorCode.TIMEOUT, message="slow", retryable=True))
    event_log.append(Error(seq=4, ref="x", code=ErrorCode.INVALID_MESSAGE, message="no", retryable=False))
    await writer.flush()
    meta = await store.client.hgetall(meta_key(SESSION))
    assert not [field for field in meta if field.startswith(b"r:")]
    assert meta[b"seq"] == b"4"


async def test_one_feed_payload_per_node_per_write_carries_every_session_after_it_is_logged(
    store: RedisStore,
) -> None:
    other = "s_other"
    await _create(store)
    await _create(store, other)
    for session in (SESSION, other):  # n_b holds both transports; the home n_a is left out
        await store.client.sadd(subs_key(session), "n_b", NODE)
    pubsub = store.client.pubsub()
    await pubsub.subscribe(node_feed_channel("n_b"), node_feed_channel(NODE))
    for _ in range(2):
        assert (await pubsub.get_message(timeout=2.0))["type"] == "subscribe"  # type: ignore[index]
    writer = _writer(store)
    first, second = _log(writer), _log(writer, other)
    for event in _deltas(1, 5):
        first.append(event)
    for event in _deltas(1, 3, request="r2"):
        second.append(event)
    await writer.flush()
    message = await pubsub.get_message(timeout=2.0)
    assert message is not None and message["type"] == "message"
    assert message["channel"] == node_feed_channel("n_b").encode()
    runs = [
        (session, [decode_event(line) for line in lines]) for session, lines in feed_runs(message["data"])
    ]
    assert runs == [(SESSION, _deltas(1, 5)), (other, _deltas(1, 3, request="r2"))]
    assert await read_after(store, SESSION, 0) == _deltas(1, 5)
    assert await pubsub.get_message(timeout=0.3) is None  # one payload, and none for the home
    await pubsub.aclose()


@pytest.mark.parametrize("last_seq", [-1, 11, 1000])
async def test_a_last_seq_the_store_never_reached_is_refused(store: RedisStore, last_seq: int) -> None:
    await _create(store)
    writer = _writer(store)
    event_log = _log(writer)
    for event in _deltas(1, 10):
        event_log.append(event)
    await writer.flush()
    assert await read_after(store, SESSION, last_seq) is None


async def test_events_no_longer_held_refuse_the_read_never_a_partial_one(store: RedisStore) -> None:
    await _create(store)
    writer = _writer(store)
    event_log = _log(writer)
    for event in _deltas(1, 50):
        event_log.append(event)
    await writer.flush()
    await store.client.xtrim(log_key(SESSION), maxlen=10, approximate=False)
    assert await read_after(store, SESSION, 39) is None
    assert await read_after(store, SESSION, 40) == _deltas(41, 10)
    assert await read_after(store, "s_unknown", 0) is None


async def test_the_stream_keeps_at_least_the_replay_window_by_count(store: RedisStore) -> None:
    await _create(store)
    writer = _writer(store)
    event_log = _log(writer, capacity=100)
    for round_ in range(10):
        for event in _deltas(round_ * 100 + 1, 100):
            event_log.append(event)
        await writer.flush()
    assert await read_after(store, SESSION, 900) == _deltas(901, 100)
    assert await store.client.xlen(log_key(SESSION)) < 1000
    assert event_log.after(899) is None and event_log.after(900) == _deltas(901, 100)


async def test_the_window_also_keeps_at_least_max_bytes_of_events(store: RedisStore) -> None:
    await _create(store)
    writer = _writer(store)
    event_log = _log(writer, capacity=10, max_bytes=20_000)
    big = [Delta(id="r1", seq=seq, text="x" * 1000) for seq in range(1, 101)]
    for event in big:
        event_log.append(event)
    await writer.flush()
    # 20 kB of ~1 kB events: about 20 of them, far more than the 10 the count alone would keep.
    held = event_log.after(event_log.oldest_seq - 1)
    assert held is not None and 20 <= len(held) <= 22
    assert await read_after(store, SESSION, 100 - 20) == big[-20:]


async def test_a_budget_sheds_the_memory_copy_never_the_window_redis_keeps(store: RedisStore) -> None:
    await _create(store)
    writer = _writer(store)
    logs: list[RedisEventLog] = []
    budget = LogBudget(4_000, lambda: [event_log.memory for event_log in logs])
    # The window by size: 15 kB of ~50 B events, about 300 of them (the count alone keeps 10).
    event_log = RedisEventLog(SESSION, "e1", capacity=10, max_bytes=15_000, writer=writer, budget=budget)
    logs.append(event_log)
    for event in _deltas(1, 250):
        event_log.append(event)
    await writer.flush()
    # ~130 B each in memory: the budget shed the oldest, Redis still has the whole window.
    assert budget.reclaims > 0 and budget.held <= budget.max_bytes
    assert event_log.memory.held_cost == budget.held and 0 < len(event_log) < 250
    assert event_log.after(0) is None and event_log.after(249) == _deltas(250, 1)
    assert await read_after(store, SESSION, 0) == _deltas(1, 250)
    for event in _deltas(251, 100):
        event_log.append(event)
    await writer.flush()
    assert await read_after(store, SESSION, 50) == _deltas(51, 300)  # trimmed below the window only
    event_log.memory.release()
    assert budget.held == 0


async def test_a_claimed_past_is_the_memory_copy_and_charged_to_the_budget(store: RedisStore) -> None:
    budget = LogBudget(1 << 20, lambda: [])
    past = _deltas(41, 10)
    event_log = RedisEventLog(
        SESSION, "e1", capacity=100, writer=_writer(store), past=past, last_seq=50, budget=budget
    )
    assert event_log.oldest_seq == 41 and event_log.after(40) == past and event_log.after(39) is None
    assert budget.held == event_log.memory.held_cost > 0
    with pytest.raises(ValueError):
        RedisEventLog(SESSION, "e1", capacity=100, writer=_writer(store), past=past, last_seq=51)


@pytest.mark.parametrize("change", ["epoch", "home", "deleted"])
async def test_a_write_to_a_session_this_node_no_longer_holds_marks_it_lost(
    store: RedisStore, change: str
) -> None:
    await _create(store)
    writer = _writer(store)
    event_log = _log(writer)
    lost: list[RedisEventLog] = []
    event_log.on_lost = lost.append
    event_log.append(Delta(id="r1", seq=1, text="a"))
    await writer.flush()
    if change == "epoch":
        await store.client.hset(meta_key(SESSION), "epoch", "e2")
    elif change == "home":
        await store.client.hset(meta_key(SESSION), "home", "n_b")
    else:
        await store.client.delete(meta_key(SESSION), log_key(SESSION))
    event_log.append(Delta(id="r1", seq=2, text="b"))
    await writer.flush()
    assert lost == [event_log] and event_log.lost
    event_log.append(Delta(id="r1", seq=3, text="c"))  # nothing more is written for it
    await writer.flush()
    assert await store.client.hget(meta_key(SESSION), "seq") in (b"1", None)


async def test_writes_wait_out_a_redis_outage_and_land_once_in_order(
    store: RedisStore, redis_server: RedisServer
) -> None:
    await _create(store)
    writer = _writer(store)
    event_log = _log(writer)
    for event in _deltas(1, 10):
        event_log.append(event)
    await writer.flush()
    redis_server.command("SAVE")
    redis_server.stop()
    for event in _deltas(11, 10):
        event_log.append(event)
    await asyncio.sleep(0.6)  # a few failed tries
    assert not store.healthy
    redis_server.start()
    await asyncio.wait_for(writer.flush(), 10)
    expected: list[LoggedMessage] = [*_deltas(1, 20)]
    assert await read_after(store, SESSION, 0) == expected


async def test_the_reply_lost_after_a_write_makes_its_retry_a_no_op(store: RedisStore) -> None:
    await _create(store)
    writer = _writer(store)
    event_log = _log(writer)
    real = store.round_trip
    answered: list[list[Any]] = []

    async def lose_the_first_reply(commands: list[bytes]) -> list[Any]:
        replies = await real(commands)  # Redis ran it...
        answered.append(replies)
        if len(answered) == 1:
            raise RedisConnectionError("connection lost")  # ...but the reply never came back
        return replies

    store.round_trip = lose_the_first_reply  # type: ignore[method-assign]
    for event in _deltas(1, 3):
        event_log.append(event)
    await asyncio.wait_for(writer.flush(), 10)
    assert answered == [[[3]], [[3]]]  # the retry found the batch applied
    assert not event_log.lost and event_log.written_seq == 3
    assert await store.client.xlen(log_key(SESSION)) == 3
    assert await read_after(store, SESSION, 0) == _deltas(1, 3)


def test_packed_commands_are_what_redis_py_would_send() -> None:
    args = [b"EVALSHA", b"0" * 40, b"2", b"sluice:{s_x}:meta", "é\n".encode(), b""]
    packed = pack(len(args), [bulk(arg) for arg in args])
    assert packed == b"".join(Redis().connection_pool.make_connection().pack_command(*args))


async def test_a_refused_command_in_a_round_trip_is_answered_in_its_place(store: RedisStore) -> None:
    commands = [
        pack(3, [bulk(b"SET"), bulk(b"k1"), bulk(b"v1")]),
        pack(2, [bulk(b"INCR"), bulk(b"k1")]),  # not an integer: refused
        pack(2, [bulk(b"GET"), bulk(b"k1")]),
    ]
    ok, refused, value = await store.round_trip(commands)
    assert ok == b"OK" and value == b"v1"
    assert isinstance(refused, ResponseError)
    assert await store.round_trip([pack(1, [bulk(b"PING")])]) == [b"PONG"]


def _incr() -> list[bytes]:
    return [pack(2, [bulk(b"INCR"), bulk(b"n")])]


async def _client_id(store: RedisStore) -> int:
    (client_id,) = await store.round_trip([pack(2, [bulk(b"CLIENT"), bulk(b"ID")])])
    assert isinstance(client_id, int)
    return client_id


async def test_round_trips_share_one_connection_that_reconnects_once_it_is_killed(
    store: RedisStore, redis_server: RedisServer
) -> None:
    first = await _client_id(store)
    for n in range(1, 51):
        assert await store.round_trip(_incr()) == [n]
    assert await _client_id(store) == first
    redis_server.command("CLIENT", "KILL", "ID", str(first))
    await asyncio.sleep(0.1)  # the link hears it is closed
    assert await store.round_trip(_incr()) == [51]
    assert await _client_id(store) != first


async def test_a_round_trip_redis_does_not_answer_in_time_fails_and_the_next_one_reconnects(
    store: RedisStore, redis_server: RedisServer
) -> None:
    assert await store.round_trip(_incr()) == [1]
    redis_server.command("CLIENT", "PAUSE", "3000", "WRITE")
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError):
        await store.round_trip(_incr())
    assert 1.9 < loop.time() - started < 2.9
    redis_server.command("CLIENT", "UNPAUSE")
    # The late reply of the abandoned round trip never answers a later one (a new connection).
    assert await store.round_trip([pack(2, [bulk(b"GET"), bulk(b"n")])]) in ([b"1"], [b"2"])
    assert await store.round_trip([pack(1, [bulk(b"PING")])]) == [b"PONG"]


async def test_a_burst_of_commands_past_the_pool_size_waits_for_connections(store: RedisStore) -> None:
    replies = await asyncio.gather(*(store.run(store.client.ping()) for _ in range(300)))
    assert replies == [True] * 300
    assert store.healthy


@pytest.mark.parametrize("request_id", ["r1", 'a,"seq":9,', '"\\', "é\u2028", ""])
def test_a_delta_from_the_feed_keeps_its_json_and_the_right_seq(request_id: str) -> None:
    delta = Delta(id=request_id, seq=1234, text=',"seq":5, "text"')
    line = encode(delta).encode()
    got = framed(line)
    assert got == Framed(1234, line.decode()) and isinstance(got, Framed) and got.event() == delta
    usage, timings = Usage(prompt_tokens=1, completion_tokens=2), Timings(queue_ms=0, ttft_ms=1, total_ms=2)
    done = Done(id=request_id, seq=7, model="m", finish_reason="stop", usage=usage, timings=timings)
    assert framed(encode(done).encode()) == done  # anything else is decoded
