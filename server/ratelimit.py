"""Per-key limits: requests per minute, generated tokens per minute, concurrent sessions.

Built on the ``limits`` library with in-memory storage: one node's counts. In cluster mode
(``SLUICE_REDIS_URL``) the same limits are also counted across every node
(`server.sharedlimits.SharedCounts`: Redis storage, decisions from a view synced every 50 ms, so
a limit may be overrun by what other nodes admit within one sync, never more). Requests use a moving window, so a burst at the edge of a minute cannot double the
rate. Tokens use a fixed window because they are charged after the fact, as they are generated:
a fixed-window counter can go past its limit (a generation already running is not cut short),
and a moving window would have to store one entry per token. A request is refused while the
key's token budget for the current window is spent.

Refusals raise ``SluiceError(rate_limited)`` with ``retry_after_ms``: when the window frees a
slot (requests, tokens), or a fixed hint for sessions, which free when another one closes.

Callers are identified by ``key_id`` (see `server.auth.key_id_for`): with auth off, every caller
shares the one id ``"anonymous"``. Client addresses are deliberately not used: behind a proxy
they are all the proxy's, and the limits exist to share a server between keys, not to tell
anonymous callers apart. This module must never see an API key itself.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from limits import RateLimitItem, RateLimitItemPerSecond
from limits.storage import MemoryStorage
from limits.strategies import FixedWindowRateLimiter, MovingWindowRateLimiter

from protocol.errors import ErrorCode, SluiceError
from server.settings import Settings
from server.sharedlimits import SharedCounts

__all__ = ["SESSION_RETRY_AFTER_MS", "RateLimiter"]

# A session slot frees when another session of the key closes, which no clock predicts.
SESSION_RETRY_AFTER_MS = 1000


class RateLimiter:
    """The per-key limits of one process.

    ``window_s`` is the length of the rate windows (60: "per minute", as the settings say);
    tests shorten it. ``clock`` must be the clock the ``limits`` memory storage uses
    (``time.time``); it only turns a window's reset time into ``retry_after_ms``.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        window_s: int = 60,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._clock = clock
        self._storage = MemoryStorage()
        self._moving = MovingWindowRateLimiter(self._storage)
        self._fixed = FixedWindowRateLimiter(self._storage)
        self._requests: RateLimitItem | None = (
            RateLimitItemPerSecond(settings.requests_per_minute, window_s, namespace="requests")
            if settings.requests_per_minute
            else None
        )
        self._tokens: RateLimitItem | None = (
            RateLimitItemPerSecond(settings.tokens_per_minute, window_s, namespace="tokens")
            if settings.tokens_per_minute
            else None
        )
        self._flush_tokens = max(1, min(64, settings.tokens_per_minute // 100))
        self._pending_tokens: dict[str, int] = {}
        self._sessions: dict[str, int] = {}
        limited = self._requests or self._tokens or settings.sessions_per_key
        self.shared: SharedCounts | None = (
            SharedCounts(
                settings.redis_url,
                requests=self._requests,
                tokens=self._tokens,
                count_sessions=bool(settings.sessions_per_key),
                window_s=window_s,
                clock=clock,
            )
            if settings.redis_url and limited
            else None
        )

    async def close(self) -> None:
        """Stop counting across the cluster (nothing to do on one node)."""
        if self.shared is not None:
            await self.shared.close()

    def limits(self) -> dict[str, int]:
        """The configured per-key limits for ``welcome.limits``; unlimited ones are left out."""
        configured = {
            "requests_per_minute": self._settings.requests_per_minute,
            "tokens_per_minute": self._settings.tokens_per_minute,
            "sessions_per_key": self._settings.sessions_per_key,
        }
        return {name: value for name, value in configured.items() if value}

    def check_request(self, key_id: str) -> None:
        """Count one request for ``key_id``, or refuse it (its token budget or request rate spent)."""
        shared = self.shared.view(key_id) if self.shared is not None else None
        if self._tokens is not None:
            self._flush(key_id, self._pending_tokens.get(key_id, 0))
            stats = self._fixed.get_window_stats(self._tokens, key_id)
            if stats.remaining <= 0:
                raise self._refusal("generated tokens per minute", stats.reset_time)
            if shared is not None and shared.tokens_left is not None:
                if shared.tokens_left - shared.pending_tokens <= 0:
                    raise self._refusal("generated tokens per minute", shared.tokens_reset)
        if self._requests is not None:
            if shared is not None and shared.requests_left is not None:
                if shared.requests_left - shared.pending_requests <= 0:
                    raise self._refusal("requests per minute", shared.requests_reset)
            if not self._moving.hit(self._requests, key_id):
                stats = self._moving.get_window_stats(self._requests, key_id)
                raise self._refusal("requests per minute", stats.reset_time)
            if shared is not None:
                shared.pending_requests += 1

    def consume_tokens(self, key_id: str, n: int) -> None:
        """Charge ``n`` generated tokens to ``key_id``; never refuses (the tokens exist already).

        Called per delta, so charges gather in a plain dict and reach the ``limits`` storage
        (a few microseconds a call) in batches of at most 1% of the budget, and always before
        `check_request` decides for that key. Tokens still gathering when a window ends are
        counted in the next one.
        """
        if self._tokens is None or n <= 0:
            return
        pending = self._pending_tokens.get(key_id, 0) + n
        if pending >= self._flush_tokens:
            self._flush(key_id, pending)
        else:
            self._pending_tokens[key_id] = pending

    def acquire_session(self, key_id: str) -> None:
        """Count one more open session for ``key_id``, or refuse it past ``sessions_per_key``
        (on the whole cluster, in cluster mode)."""
        limit = self._settings.sessions_per_key
        count = self._sessions.get(key_id, 0)
        open_now = self.shared.sessions(key_id) if self.shared is not None else count
        if limit and open_now >= limit:
            raise SluiceError(
                ErrorCode.RATE_LIMITED,
                f"too many concurrent sessions for this key (limit {limit})",
                retry_after_ms=SESSION_RETRY_AFTER_MS,
            )
        self._sessions[key_id] = count + 1
        if self.shared is not None:
            self.shared.session_opened(key_id)

    def release_session(self, key_id: str) -> None:
        """Count one session of ``key_id`` closed; extra releases are ignored."""
        count = self._sessions.get(key_id, 0)
        if self.shared is not None:
            self.shared.session_closed(key_id)
        if count <= 1:
            self._sessions.pop(key_id, None)
        else:
            self._sessions[key_id] = count - 1

    def open_sessions(self, key_id: str) -> int:
        return self._sessions.get(key_id, 0)

    def _flush(self, key_id: str, pending: int) -> None:
        self._pending_tokens.pop(key_id, None)
        if pending and self._tokens is not None:
            self._fixed.hit(self._tokens, key_id, cost=pending)
            if self.shared is not None:
                self.shared.view(key_id).pending_tokens += pending

    def _refusal(self, what: str, reset_time: float) -> SluiceError:
        retry_after_ms = max(1, math.ceil((reset_time - self._clock()) * 1000))
        return SluiceError(
            ErrorCode.RATE_LIMITED, f"rate limit reached: {what}", retry_after_ms=retry_after_ms
        )
