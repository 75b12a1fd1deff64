"""Per-key request, token and session limits (server/ratelimit.py)."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from protocol.errors import ErrorCode, SluiceError
from server.ratelimit import SESSION_RETRY_AFTER_MS, RateLimiter
from server.settings import Settings


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """One fake wall clock for both the limiter and the ``limits`` memory storage."""
    fake = FakeClock()
    monkeypatch.setattr("limits.storage.memory.time", SimpleNamespace(time=fake))
    return fake


def limiter(clock: FakeClock, **limits: int) -> RateLimiter:
    return RateLimiter(Settings(**limits), clock=clock)  # type: ignore[arg-type]


def refusal(excinfo: pytest.ExceptionInfo[SluiceError]) -> int:
    assert excinfo.value.code is ErrorCode.RATE_LIMITED and excinfo.value.retryable
    assert excinfo.value.retry_after_ms is not None
    return excinfo.value.retry_after_ms


def test_unlimited_by_default(clock: FakeClock) -> None:
    rl = limiter(clock)
    for _ in range(500):
        rl.check_request("k")
        rl.consume_tokens("k", 1000)
        rl.acquire_session("k")
    assert rl.limits() == {}


def test_limits_are_announced() -> None:
    rl = RateLimiter(Settings(requests_per_minute=10, tokens_per_minute=500, sessions_per_key=2))
    assert rl.limits() == {"requests_per_minute": 10, "tokens_per_minute": 500, "sessions_per_key": 2}


def test_requests_per_minute_moving_window(clock: FakeClock) -> None:
    rl = limiter(clock, requests_per_minute=3)
    for _ in range(3):
        rl.check_request("k")
        clock.now += 10
    with pytest.raises(SluiceError) as excinfo:
        rl.check_request("k")
    # The first request (30 s ago) leaves the window in 30 s.
    assert refusal(excinfo) == 30_000
    rl.check_request("other-key")  # keys are counted apart
    clock.now += 29.5
    with pytest.raises(SluiceError) as excinfo:
        rl.check_request("k")
    assert 0 < refusal(excinfo) <= 500
    clock.now += 0.6
    rl.check_request("k")  # one slot freed, and taken
    with pytest.raises(SluiceError):
        rl.check_request("k")


def test_token_budget_refuses_the_next_request_until_the_window_ends(clock: FakeClock) -> None:
    rl = limiter(clock, tokens_per_minute=100)
    rl.check_request("k")
    rl.consume_tokens("k", 60)
    rl.check_request("k")
    clock.now += 15
    # A generation already running is charged in full, past the budget.
    for _ in range(75):
        rl.consume_tokens("k", 1)
    with pytest.raises(SluiceError) as excinfo:
        rl.check_request("k")
    assert refusal(excinfo) == 45_000
    rl.check_request("someone-else")
    clock.now += 45.01
    rl.consume_tokens("k", 99)
    rl.check_request("k")
    rl.consume_tokens("k", 1)
    with pytest.raises(SluiceError):
        rl.check_request("k")


def test_token_charges_gather_but_are_counted_before_each_decision(clock: FakeClock) -> None:
    rl = limiter(clock, tokens_per_minute=100_000)  # charges gather in batches of up to 64
    for _ in range(99_999):
        rl.consume_tokens("k", 1)
    rl.check_request("k")  # 1 token left
    rl.consume_tokens("k", 1)  # pending, not yet flushed
    with pytest.raises(SluiceError) as excinfo:
        rl.check_request("k")
    assert refusal(excinfo) == 60_000


def test_sessions_per_key(clock: FakeClock) -> None:
    rl = limiter(clock, sessions_per_key=2)
    rl.acquire_session("k")
    rl.acquire_session("k")
    with pytest.raises(SluiceError) as excinfo:
        rl.acquire_session("k")
    assert refusal(excinfo) == SESSION_RETRY_AFTER_MS
    rl.acquire_session("other")
    assert rl.open_sessions("k") == 2
    rl.release_session("k")
    rl.acquire_session("k")
    rl.release_session("k")
    rl.release_session("k")
    rl.release_session("k")  # an extra release never makes room for more than the limit
    assert rl.open_sessions("k") == 0
    rl.acquire_session("k")
    rl.acquire_session("k")
    with pytest.raises(SluiceError):
        rl.acquire_session("k")


def test_recovery_with_a_real_short_window() -> None:
    """The same limits on the real clock, with a one-second window instead of a minute."""
    rl = RateLimiter(Settings(requests_per_minute=2, tokens_per_minute=10), window_s=1)
    rl.check_request("k")
    rl.check_request("k")
    with pytest.raises(SluiceError) as excinfo:
        rl.check_request("k")
    assert 0 < refusal(excinfo) <= 1000
    rl.consume_tokens("other", 10)
    with pytest.raises(SluiceError) as excinfo:
        rl.check_request("other")
    assert 0 < refusal(excinfo) <= 1000
    time.sleep(1.2)
    rl.check_request("k")
    rl.check_request("other")
