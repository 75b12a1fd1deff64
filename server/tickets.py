"""Short-lived, signed, single-use tickets (issued by `POST /v1/tickets`, `server.api.tickets`).

Browsers cannot set headers on a WebSocket or an ``EventSource``, so they trade their API key
(sent once, in an ``Authorization`` header) for a ticket that may travel in a URL (``?ticket=``).
A ticket is ``<payload>.<signature>``, both base64url: the payload names the key's non-secret
``key_id``, an expiry, a random nonce and optionally the one session it may open. It is signed
with HMAC-SHA256 and accepted once: its nonce is remembered until it expires.

This module must never see or hold an API key: it deals in ``key_id`` only, so a ticket leaked
from a log or a proxy gives nothing beyond one connection for ``ticket_ttl_s`` seconds.

With several worker processes, set ``SLUICE_TICKET_SECRET``: the random per-process secret used
otherwise makes a ticket valid only in the process that issued it (and each process remembers
its own used nonces).
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

from protocol.errors import ErrorCode, SluiceError

__all__ = ["TicketBook", "TicketClaims"]

# A ticket is a few hundred bytes; anything far longer is not one of ours, and refusing it
# before any decoding bounds the work a stranger can make us do.
_MAX_TICKET_CHARS = 1024
_INVALID = "invalid or expired ticket"


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


class TicketBook:
    """Issues and verifies tickets; remembers used nonces until their tickets expire.

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
    ) -> None:
        if ttl_s <= 0:
            raise ValueError("ticket ttl must be positive")
        self.ttl_s = ttl_s
        self._secret = secret.encode() if secret else secrets.token_bytes(32)
        self._max_used = max_used
        self._clock = clock
        # nonce -> expiry. Every ticket lives ttl_s, so insertion order is expiry order and
        # pruning only ever looks at the front.
        self._used: dict[str, float] = {}

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
