"""The real-Redis test helper (tests/support/redis_server.py): start, answer, stop, restart kept
or empty, always cleaned up; and what each persistence setting keeps through a crash of Redis, as
README's "Redis persistence" table says."""

from __future__ import annotations

import socket

import pytest

from tests.support.redis_server import RedisError, RedisServer, run_redis


def _port_accepts(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_starts_on_loopback_answers_and_stops_cleanly() -> None:
    with run_redis() as redis:
        assert redis.url == f"redis://127.0.0.1:{redis.port}/0"
        assert redis.command("PING") == "PONG"
        assert redis.command("SET", "k", "v", "NX", "EX", 30) == "OK"
        assert redis.command("SET", "k", "w", "NX", "EX", 30) is None
        assert redis.command("GET", "k") == b"v"
        assert redis.command("INCR", "n") == 1
        assert redis.command("MGET", "k", "missing") == [b"v", None]
        with pytest.raises(RedisError):
            redis.command("NOSUCHCOMMAND")
        # Bound to loopback only, in its own directory, with persistence off.
        assert redis.command("CONFIG", "GET", "bind") == [b"bind", b"127.0.0.1"]
        assert redis.command("CONFIG", "GET", "dir") == [b"dir", str(redis.dir).encode()]
        assert redis.command("CONFIG", "GET", "appendonly") == [b"appendonly", b"no"]
        port, directory = redis.port, redis.dir
    assert not _port_accepts(port)
    assert not directory.exists()


def test_stop_then_start_on_the_same_port() -> None:
    with run_redis() as redis:
        redis.stop()
        assert not redis.running
        assert not _port_accepts(redis.port)
        with pytest.raises(OSError):
            redis.command("PING", timeout=0.5)
        redis.start()
        assert redis.command("PING") == "PONG"


def test_restart_keeps_data_or_comes_back_empty() -> None:
    with run_redis() as redis:
        redis.command("SET", "kept", "1")
        redis.restart()
        assert redis.command("GET", "kept") == b"1"
        redis.restart(empty=True)
        assert redis.command("DBSIZE") == 0
        assert redis.command("GET", "kept") is None


def test_restart_empty_with_aof_on_loses_everything() -> None:
    with run_redis(appendonly=True) as redis:
        redis.command("SET", "k", "1")
        redis.restart()
        assert redis.command("GET", "k") == b"1"
        redis.restart(empty=True)
        assert redis.command("DBSIZE") == 0


def test_a_failed_start_says_why_and_leaves_nothing_running() -> None:
    with run_redis() as redis:
        clash = RedisServer(port=redis.port)  # the port is taken: this one cannot bind
        try:
            with pytest.raises(RuntimeError, match="redis-server"):
                clash.start(timeout=10)
            assert not clash.running
        finally:
            clash.close()
        assert redis.command("PING") == "PONG"


def test_a_picked_port_taken_before_redis_bound_it_is_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.support import redis_server as support

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        picks = iter([taken])
        real = support._free_port
        monkeypatch.setattr(support, "_free_port", lambda: next(picks, None) or real())
        with run_redis() as redis:
            assert redis.port != taken and redis.url == f"redis://127.0.0.1:{redis.port}/0"
            assert redis.command("PING") == "PONG"
            held = redis.port
            redis.restart()  # once it has held a port, it keeps it
            assert redis.port == held and redis.command("PING") == "PONG"


# -- what README's "Redis persistence" table says of each setting, observed on the real server --


def _write_and_crash(redis: RedisServer, count: int) -> None:
    for n in range(count):
        assert redis.command("SET", f"event:{n}", "x") == "OK"  # acknowledged
    redis.kill()  # SIGKILL: no shutdown, no save


def test_without_persistence_a_restart_comes_back_empty() -> None:
    with run_redis() as redis:
        redis.command("SET", "k", "v")
        redis.stop()
        redis.start()
        assert redis.command("DBSIZE") == 0


def test_aof_everysec_keeps_every_acknowledged_write_through_a_crash_of_redis() -> None:
    with run_redis(appendonly=True) as redis:
        redis.command("CONFIG", "SET", "appendfsync", "everysec")
        _write_and_crash(redis, 500)
        redis.start()
        assert redis.command("DBSIZE") == 500


def test_rdb_snapshots_alone_come_back_stale_after_a_crash() -> None:
    # The dangerous case: an older state that still looks valid.
    with run_redis(save="3600 1") as redis:
        redis.command("SET", "before-snapshot", "x")
        redis.command("SAVE")
        _write_and_crash(redis, 100)
        redis.start()
        assert redis.command("GET", "before-snapshot") == b"x"
        assert redis.command("DBSIZE") == 1  # every write after the snapshot is gone
