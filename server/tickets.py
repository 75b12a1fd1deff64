"""Short-lived, signed, single-use tickets (issued by `POST /v1/tickets`, `server.api.tickets`).

Browsers cannot set headers on a WebSocket or an ``EventSource``, so they trade their API key
(sent once, in an ``Authorization`` header) for a ticket that may travel in a URL (``?ticket=``).
A ticket is ``<payload>.<signature>``, both base64url: the payload names the key's non-secret
``key_id``, an expiry, a random nonce and optionally the one session it may open. It is signed
with HMAC-SHA256 and accepted once: its nonce is remembered until it expires.

This module must never see or hold an API key: it deals in ``key_id`` only, so a ticket leaked
from a log or a proxy gives nothing beyond one connection for ``ticket_ttl_s`` seconds.

One node: the secret is ``SLUICE_TICKET_SECRET``, or random per process; used nonces are kept in
memory. Cluster mode (``SLUICE_REDIS_URL``, `TicketBook.from_settings`): a ticket issued by any
node works once, on any node, with no other setting. Its nonce is spent with ``SET NX`` in Redis
(expiring with the ticket), and the nodes sign with one secret: ``SLUICE_TICKET_SECRET`` when
set, else one derived from the configured API keys (an HMAC of them, so it reveals nothing of
them), which every node of a cluster shares already. Changing the keys changes the secret and
voids outstanding tickets (they live ``ticket_ttl_s``, 60 s by default).

Spending a nonce in Redis is one round trip per ticket used (once per browser connection, not
per message), made from the event loop with a 250 ms timeout; while Redis is unreachable tickets
are refused with ``upstream_unavailable`` (retryable), and for a second after a failure no
attempt is made, so an unreachable Redis cannot stall the loop on every connection.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from protocol.errors import ErrorCode, SluiceError

if TYPE_CHECKING:
    from server.settings import Settings

__all__ = ["RedisNonces", "SpentNonces", "TicketBook", "TicketClaims", "cluster_ticket_secret"]

# A ticket is a few hundred bytes; anything far longer is not one of ours, and refusing it
# before any decoding bounds the work a stranger can make us do.
_MAX_TICKET_CHARS = 1024
_INVALID = "invalid or expired ticket"
# Cluster mode: how long a nonce check may take, and how long to stop trying after a failure.
_REDIS_TIMEOUT_S = 0.25
_REDIS_BACKOFF_S = 1.0
_NONCE_PREFIX = "sluice:ticket:"


@dataclass(frozen=True, slots=True)
class TicketClaims:
    """What a verified ticket says: whose it is, until when, and which session it may open."""

    key_id: str
    expires_at: float
    session: str | None = None


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def cluster_ticket_secret(api_keys: list[str]) -> str:
    """The signing secret every node of a cluster derives alike from its API keys (see the module
    docstring); order and repeats of the keys do not matter."""
    material = "\n".join(sorted(set(api_keys))).encode()
    return hmac.new(b"sluice ticket secret v1", material, hashlib.sha256).hexdigest()


class SpentNonces(Protocol):
    """Where used nonces are kept when they must be shared (cluster mode)."""

    def spend(self, nonce: str, ttl_s: float) -> bool:
        """Mark ``nonce`` used for ``ttl_s`` seconds: True if it was not used before. Raises
        ``SluiceError(upstream_unavailable)`` when the store cannot answer."""
        ...


class RedisNonces:
    """`SpentNonces` in Redis: ``SET sluice:ticket:<nonce> 1 NX PX <ttl>``, one round trip."""

    def __init__(self, url: str, *, clock: Callable[[], float] = time.monotonic) -> None:
        import redis  # cluster mode only

        self._client = redis.Redis.from_url(
            url, socket_timeout=_REDIS_TIMEOUT_S, socket_connect_timeout=_REDIS_TIMEOUT_S
        )
        self._errors: tuple[type[Exception], ...] = (redis.RedisError, OSError)
        self._clock = clock
        self._retry_at = 0.0

    def spend(self, nonce: str, ttl_s: float) -> bool:
        if self._clock() < self._retry_at:
            raise _store_unavailable()
        try:
            created = self._client.set(_NONCE_PREFIX + nonce, b"1", nx=True, px=max(1, int(ttl_s * 1000)))
        except self._errors:
            self._retry_at = self._clock() + _REDIS_BACKOFF_S
            raise _store_unavailable() from None
        return bool(created)

    def close(self) -> None:
        self._client.close()


def _store_unavailable() -> SluiceError:
    return SluiceError(
        ErrorCode.UPSTREAM_UNAVAILABLE,
        "tickets cannot be checked: the session store (Redis) is unreachable",
        retry_after_ms=int(_REDIS_BACKOFF_S * 1000),
    )


class TicketBook:
    """Issues and verifies tickets; remembers used nonces until their tickets expire (in memory,
    or in ``shared`` when given: cluster mode).

    ``max_used`` bounds the memory of used nonces. When that many tickets were used within one
    ``ttl_s``, further tickets are refused with ``overloaded`` until the oldest expire: refusing
    is safe, forgetting a nonce early would let its ticket be used twice.
    """

    def __init__(
        self,
        *,
        ttl_s: float,
        secret: str = "",
        max_used: int = 100_000,
        clock: Callable[[], float] = time.time,
        shared: SpentNonces | None = None,
    ) -> None:
        if ttl_s <= 0:
            raise ValueError("ticket ttl must be positive")
        if shared is not None and not secret:
            raise ValueError("shared nonces need a secret every node knows")
        self.ttl_s = ttl_s
        self._secret = secret.encode() if secret else secrets.token_bytes(32)
        self._max_used = max_used
        self._clock = clock
        self._shared = shared
        # nonce -> expiry. Every ticket lives ttl_s, so insertion order is expiry order and
        # pruning only ever looks at the front.
        self._used: dict[str, float] = {}

    @classmethod
    def from_settings(cls, settings: Settings, *, clock: Callable[[], float] = time.time) -> TicketBook:
        """The book for ``settings``: in cluster mode (``redis_url``) its nonces are spent in Redis
        and its secret is shared (`cluster_ticket_secret` unless ``ticket_secret`` is set)."""
        if not settings.redis_url:
            return cls(ttl_s=settings.ticket_ttl_s, secret=settings.ticket_secret, clock=clock)
        secret = settings.ticket_secret or cluster_ticket_secret(settings.api_keys)
        return cls(
            ttl_s=settings.ticket_ttl_s, secret=secret, clock=clock, shared=RedisNonces(settings.redis_url)
        )

    def issue(self, key_id: str, *, session: str | None = None) -> str:
        """A new ticket for ``key_id``, valid for ``ttl_s`` seconds, once."""
        claims: dict[str, object] = {
            "k": key_id,
            "e": round(self._clock() + self.ttl_s, 3),
            "n": _b64encode(secrets.token_bytes(16)),
        }
        if session is not None:
            claims["s"] = session
        payload = _b64encode(json.dumps(claims, separators=(",", ":")).encode())
        return f"{payload}.{self._sign(payload)}"

    def verify(self, ticket: str) -> TicketClaims:
        """The claims of a valid, unexpired, unused ticket, which is then used up.

        Raises ``SluiceError(unauthorized)`` for anything else, with one message whatever the
        reason, so a prober learns nothing about which check failed.
        """
        if len(ticket) > _MAX_TICKET_CHARS or ticket.count(".") != 1:
            raise SluiceError(ErrorCode.UNAUTHORIZED, _INVALID)
        payload, signature = ticket.split(".")
        # Signature first: nothing unsigned is ever parsed.
        if not hmac.compare_digest(self._sign(payload).encode(), signature.encode()):
            raise SluiceError(ErrorCode.UNAUTHORIZED, _INVALID)
        claims = self._parse(payload)
        now = self._clock()
        if claims[0].expires_at <= now:
            raise SluiceError(ErrorCode.UNAUTHORIZED, _INVALID)
        self._spend(claims[1], claims[0].expires_at, now)
        return claims[0]

    @property
    def used_count(self) -> int:
        """How many used nonces are remembered now (for tests and metrics)."""
        return len(self._used)

    def _sign(self, payload: str) -> str:
        return _b64encode(hmac.new(self._secret, payload.encode("ascii"), hashlib.sha256).digest())

    @staticmethod
    def _parse(payload: str) -> tuple[TicketClaims, str]:
        try:
            raw = json.loads(_b64decode(payload))
        except (binascii.Error, ValueError):
            raise SluiceError(ErrorCode.UNAUTHORIZED, _INVALID) from None
        if not isinstance(raw, dict):
            raise SluiceError(ErrorCode.UNAUTHORIZED, _INVALID)
        key_id, expires, nonce, session = raw.get("k"), raw.get("e"), raw.get("n"), raw.get("s")
        if (
            not isinstance(key_id, str)
            or not isinstance(expires, int | float)
            or not isinstance(nonce, str)
            or not (session is None or isinstance(session, str))
        ):
            raise SluiceError(ErrorCode.UNAUTHORIZED, _INVALID)
        return TicketClaims(key_id=key_id, expires_at=float(expires), session=session), nonce

    def _spend(self, nonce: str, expires_at: float, now: float) -> None:
        if self._shared is not None:
            if not self._shared.spend(nonce, expires_at - now):
                raise SluiceError(ErrorCode.UNAUTHORIZED, _INVALID)
            return
        self._prune(now)
        if nonce in self._used:
            raise SluiceError(ErrorCode.UNAUTHORIZED, _INVALID)
        if len(self._used) >= self._max_used:
            oldest = next(iter(self._used.values()))
            raise SluiceError(
                ErrorCode.OVERLOADED,
                "too many tickets in use; retry shortly",
                retry_after_ms=max(1, int((oldest - now) * 1000)),
            )
        self._used[nonce] = expires_at

    def _prune(self, now: float) -> None:
        while self._used:
            nonce, expires_at = next(iter(self._used.items()))
            if expires_at > now:
                return
            del self._used[nonce]
