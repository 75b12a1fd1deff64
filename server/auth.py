"""Who is calling, and from which page: API keys, tickets and the Origin allow-list.

`Authenticator.authenticate` turns whatever credential a transport has (an ``Authorization``
header, a ``?ticket=``, a ``hello.token``) into a `Principal`, or refuses with
``SluiceError(unauthorized)``. `Authenticator.check_origin` decides whether a browser page may
open a WebSocket or SSE stream here (PROTOCOL.md §4).

Keys may be configured in plain text or as ``sha256:<hex>``; either way only their SHA-256
digests are kept, and a presented key is compared digest against digest in constant time. This
module must never log a key, put one in a URL or an error message, or keep one in a `Principal`:
the `Principal` carries a ``key_id`` (the first 12 hex digits of the key's SHA-256), which is
what rate limits, logs and tickets use.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from protocol.errors import ErrorCode, SluiceError
from server.settings import Settings
from server.tickets import TicketBook

__all__ = ["ANONYMOUS", "Authenticator", "OriginPolicy", "Principal", "key_id_for"]

# The key id shared by every caller while auth is off (see server/ratelimit.py).
ANONYMOUS = "anonymous"
_HASH_PREFIX = "sha256:"
_KEY_ID_HEX = 12


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller.

    ``session`` is set when the caller came with a session-bound ticket: that ticket may only
    open that session (see `allows_session`).
    """

    key_id: str
    session: str | None = None

    def allows_session(self, session: str | None) -> bool:
        """Whether this caller may open or resume ``session`` (None: a new session)."""
        return self.session is None or self.session == session


def key_id_for(principal: Principal | None) -> str:
    """The id limits and logs use: the principal's ``key_id``, or `ANONYMOUS` when auth is off."""
    return ANONYMOUS if principal is None else principal.key_id


def _digest_of_entry(entry: str) -> bytes:
    if entry.lower().startswith(_HASH_PREFIX):
        hex_digest = entry[len(_HASH_PREFIX) :].strip()
        try:
            digest = bytes.fromhex(hex_digest)
        except ValueError:
            raise ValueError("an api_keys entry starting with 'sha256:' must be 64 hex digits") from None
        if len(digest) != hashlib.sha256().digest_size:
            raise ValueError("an api_keys entry starting with 'sha256:' must be 64 hex digits")
        return digest
    return hashlib.sha256(entry.encode()).digest()


class Authenticator:
    """Checks credentials and origins against `Settings`, and issues tickets.

    ``clock`` (wall-clock seconds) is injectable so tests can expire tickets without sleeping.
    """

    def __init__(self, settings: Settings, *, clock: Callable[[], float] = time.time) -> None:
        self._digests: tuple[bytes, ...] = tuple(_digest_of_entry(entry) for entry in settings.api_keys)
        self._tickets = TicketBook.from_settings(settings, clock=clock)
        self.origins = OriginPolicy(settings.allowed_origins)

    @property
    def auth_required(self) -> bool:
        return bool(self._digests)

    def authenticate(
        self,
        *,
        authorization: str | None = None,
        ticket: str | None = None,
        hello_token: str | None = None,
        session: str | None = None,
    ) -> Principal | None:
        """The caller behind the first credential given, in the order of the parameters.

        Returns None when auth is off (whatever was given). Raises ``SluiceError(unauthorized)``
        when no credential was given, or the first one given is wrong: a wrong header is not
        rescued by a right token. A ticket is used up by this call. When ``session`` is given
        and the ticket is bound to another session, the ticket is refused.
        """
        if not self.auth_required:
            return None
        if authorization:
            return self._check_key(_bearer_token(authorization))
        if ticket:
            claims = self._tickets.verify(ticket)
            if claims.session is not None and session is not None and claims.session != session:
                raise SluiceError(ErrorCode.UNAUTHORIZED, "ticket is bound to another session")
            return Principal(key_id=claims.key_id, session=claims.session)
        if hello_token:
            return self._check_key(hello_token)
        raise SluiceError(ErrorCode.UNAUTHORIZED, "an API key or ticket is required")

    def issue_ticket(self, principal: Principal | None, *, session: str | None = None) -> tuple[str, int]:
        """A signed single-use ticket for ``principal`` and its lifetime in seconds."""
        ticket = self._tickets.issue(key_id_for(principal), session=session)
        return ticket, int(self._tickets.ttl_s)

    def check_origin(self, origin: str | None, host: str | None, scheme: str = "http") -> bool:
        """Whether a request with this ``Origin`` may proceed; see `OriginPolicy.allows`."""
        return self.origins.allows(origin, host, scheme)

    def _check_key(self, key: str) -> Principal:
        presented = hashlib.sha256(key.encode()).digest()
        # Compare against every configured digest, without stopping early, so the time taken
        # does not say which entry (or whether any) came close.
        matched = False
        for digest in self._digests:
            matched |= hmac.compare_digest(presented, digest)
        if not matched:
            raise SluiceError(ErrorCode.UNAUTHORIZED, "invalid API key")
        return Principal(key_id=presented.hex()[:_KEY_ID_HEX])


def _bearer_token(authorization: str) -> str:
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise SluiceError(ErrorCode.UNAUTHORIZED, "Authorization must be 'Bearer <key>'")
    return token.strip()


_DEFAULT_PORTS = {"http": 80, "https": 443}
_WS_SCHEMES = {"ws": "http", "wss": "https"}
# Allowed when SLUICE_ALLOWED_ORIGINS is empty (DESIGN.md: "the server's own origin and
# http://localhost:*"); an operator who sets the list names every other origin explicitly.
_LOCAL_ORIGINS = ("http://localhost:*", "http://127.0.0.1:*", "http://[::1]:*")


@dataclass(frozen=True, slots=True)
class _Origin:
    scheme: str
    host: str
    port: int | None  # None: any port (only in patterns)


def _parse_origin(text: str, *, pattern: bool = False) -> _Origin | None:
    """``scheme://host[:port]`` normalised (lower case, default port filled in), or None."""
    text = text.strip().lower().rstrip("/")
    any_port = pattern and text.endswith(":*")
    if any_port:
        text = text[:-2]
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        return None
    scheme = _WS_SCHEMES.get(parts.scheme, parts.scheme)
    if scheme not in _DEFAULT_PORTS or not parts.hostname or parts.path or parts.query:
        return None
    if parts.username is not None or parts.password is not None:
        return None
    if any_port:
        return _Origin(scheme, parts.hostname, None)
    return _Origin(scheme, parts.hostname, port if port is not None else _DEFAULT_PORTS[scheme])


class OriginPolicy:
    """The Origin allow-list of PROTOCOL.md §4.

    Allowed: requests without an ``Origin`` header (non-browser clients); the server's own
    origin (scheme + ``Host`` header); every entry of ``allowed`` — exact origins,
    ``scheme://host:*`` for any port, or ``*`` for any origin; and, only when ``allowed`` is
    empty, http on localhost, 127.0.0.1 and [::1] at any port. Everything else, including the
    opaque origin ``null`` (sandboxed frames, ``file:``), is refused unless listed as ``null``.
    """

    def __init__(self, allowed: Iterable[str]) -> None:
        entries = [entry.strip() for entry in allowed if entry.strip()]
        self.allow_any = "*" in entries
        self.allow_null = "null" in (entry.lower() for entry in entries)
        sources = entries or list(_LOCAL_ORIGINS)
        patterns: list[_Origin] = []
        for entry in sources:
            if entry in ("*", "null"):
                continue
            parsed = _parse_origin(entry, pattern=True)
            if parsed is None:
                raise ValueError(f"allowed origin {entry!r} is not scheme://host[:port|:*]")
            patterns.append(parsed)
        self._patterns = tuple(patterns)

    def allows(self, origin: str | None, host: str | None, scheme: str = "http") -> bool:
        if origin is None:
            return True
        if self.allow_any:
            return True
        if origin.strip().lower() == "null":
            return self.allow_null
        parsed = _parse_origin(origin)
        if parsed is None:
            return False
        if host and parsed == _parse_origin(f"{scheme}://{host}"):
            return True
        return any(
            pattern.scheme == parsed.scheme
            and pattern.host == parsed.host
            and (pattern.port is None or pattern.port == parsed.port)
            for pattern in self._patterns
        )
