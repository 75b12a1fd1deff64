"""API keys, tickets, the origin allow-list and the tickets route (server/auth.py, server/tickets.py)."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest

from protocol.errors import ErrorCode, SluiceError
from server.auth import ANONYMOUS, Authenticator, OriginPolicy, Principal, key_id_for
from server.settings import Settings
from server.tickets import TicketBook

KEY = "sk-test-0123456789"
OTHER_KEY = "sk-other-abcdef"
KEY_ID = hashlib.sha256(KEY.encode()).hexdigest()[:12]


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make(api_keys: list[str] | None = None, **extra: object) -> tuple[Authenticator, FakeClock]:
    clock = FakeClock()
    settings = Settings(api_keys=api_keys or [], **extra)  # type: ignore[arg-type]
    return Authenticator(settings, clock=clock), clock


def unauthorized(excinfo: pytest.ExceptionInfo[SluiceError]) -> bool:
    return excinfo.value.code is ErrorCode.UNAUTHORIZED and not excinfo.value.retryable


# Keys.


def test_auth_off_without_keys_returns_none_for_anything() -> None:
    auth, _ = make()
    assert not auth.auth_required
    assert auth.authenticate() is None
    assert auth.authenticate(authorization="Bearer nonsense", ticket="x.y", hello_token="z") is None
    assert key_id_for(None) == ANONYMOUS


@pytest.mark.parametrize("entry", [KEY, "sha256:" + hashlib.sha256(KEY.encode()).hexdigest()])
def test_plain_and_hashed_keys_authenticate_by_header_and_hello_token(entry: str) -> None:
    auth, _ = make([OTHER_KEY, entry])
    assert auth.auth_required
    assert auth.authenticate(authorization=f"Bearer {KEY}") == Principal(key_id=KEY_ID)
    assert auth.authenticate(authorization=f"bearer   {KEY} ") == Principal(key_id=KEY_ID)
    assert auth.authenticate(hello_token=KEY) == Principal(key_id=KEY_ID)
    other = auth.authenticate(hello_token=OTHER_KEY)
    assert other is not None and other.key_id != KEY_ID


def test_key_id_is_stable_and_not_the_key() -> None:
    auth, _ = make([KEY])
    principal = auth.authenticate(authorization=f"Bearer {KEY}")
    assert principal is not None
    assert principal.key_id == KEY_ID and KEY not in repr(principal)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"authorization": f"Bearer {KEY}x"},
        {"authorization": f"Basic {KEY}"},
        {"authorization": "Bearer "},
        {"authorization": KEY},
        {"hello_token": "wrong"},
        # The first credential given decides: a wrong header is not rescued by a right token.
        {"authorization": "Bearer wrong", "hello_token": KEY},
    ],
)
def test_missing_or_wrong_credentials_are_unauthorized(kwargs: dict[str, str]) -> None:
    auth, _ = make([KEY])
    with pytest.raises(SluiceError) as excinfo:
        auth.authenticate(**kwargs)
    assert unauthorized(excinfo)
    assert KEY not in excinfo.value.message


def test_hashed_entry_must_be_a_sha256_digest() -> None:
    with pytest.raises(ValueError):
        make(["sha256:abcd"])
    with pytest.raises(ValueError):
        make(["sha256:" + "zz" * 32])


# Tickets.


def test_ticket_authenticates_once() -> None:
    auth, _ = make([KEY])
    principal = auth.authenticate(authorization=f"Bearer {KEY}")
    ticket, expires_in_s = auth.issue_ticket(principal)
    assert expires_in_s == 60
    assert KEY not in ticket and KEY not in base64.urlsafe_b64decode(ticket.split(".")[0] + "==").decode()
    assert auth.authenticate(ticket=ticket) == Principal(key_id=KEY_ID)
    with pytest.raises(SluiceError) as excinfo:
        auth.authenticate(ticket=ticket)
    assert unauthorized(excinfo)


def test_ticket_expires() -> None:
    auth, clock = make([KEY], ticket_ttl_s=30)
    ticket, expires_in_s = auth.issue_ticket(Principal(KEY_ID))
    assert expires_in_s == 30
    clock.now += 30.5
    with pytest.raises(SluiceError) as excinfo:
        auth.authenticate(ticket=ticket)
    assert unauthorized(excinfo)
    fresh, _ = auth.issue_ticket(Principal(KEY_ID))
    clock.now += 29
    assert auth.authenticate(ticket=fresh) == Principal(KEY_ID)


def _tamper(ticket: str) -> str:
    payload, signature = ticket.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["e"] += 3600
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{forged}.{signature}"


@pytest.mark.parametrize(
    "mangle",
    [
        _tamper,
        lambda t: t[:-2] + ("AA" if not t.endswith("AA") else "BB"),
        lambda t: t.replace(".", ""),
        lambda t: t + ".x",
        lambda t: "x" * 5000,
        lambda t: "!!!.???",
        lambda t: "",
    ],
)
def test_tampered_or_garbage_tickets_are_refused(mangle: object) -> None:
    auth, _ = make([KEY])
    ticket, _ = auth.issue_ticket(Principal(KEY_ID))
    bad = mangle(ticket)  # type: ignore[operator]
    with pytest.raises(SluiceError) as excinfo:
        auth.authenticate(ticket=bad or None)
    assert unauthorized(excinfo)
    # The genuine ticket is still good: a forgery did not use it up.
    assert auth.authenticate(ticket=ticket) == Principal(KEY_ID)


def test_ticket_signed_by_another_process_is_refused_unless_the_secret_is_shared() -> None:
    one, _ = make([KEY])
    two, _ = make([KEY])
    ticket, _ = one.issue_ticket(Principal(KEY_ID))
    with pytest.raises(SluiceError):
        two.authenticate(ticket=ticket)
    shared_a, _ = make([KEY], ticket_secret="s3cret")
    shared_b, _ = make([KEY], ticket_secret="s3cret")
    ticket, _ = shared_a.issue_ticket(Principal(KEY_ID))
    assert shared_b.authenticate(ticket=ticket) == Principal(KEY_ID)


def test_session_bound_ticket() -> None:
    auth, _ = make([KEY])
    ticket, _ = auth.issue_ticket(Principal(KEY_ID), session="s-1")
    with pytest.raises(SluiceError) as excinfo:
        auth.authenticate(ticket=ticket, session="s-2")
    assert unauthorized(excinfo)
    ticket, _ = auth.issue_ticket(Principal(KEY_ID), session="s-1")
    principal = auth.authenticate(ticket=ticket, session="s-1")
    assert principal == Principal(KEY_ID, session="s-1")
    # Checked later by a transport that learns the session from hello.
    ticket, _ = auth.issue_ticket(Principal(KEY_ID), session="s-1")
    principal = auth.authenticate(ticket=ticket)
    assert principal is not None
    assert principal.allows_session("s-1")
    assert not principal.allows_session("s-2") and not principal.allows_session(None)
    assert Principal(KEY_ID).allows_session(None) and Principal(KEY_ID).allows_session("any")


def test_used_nonces_are_forgotten_after_expiry_and_bounded() -> None:
    clock = FakeClock()
    book = TicketBook(ttl_s=10, max_used=3, clock=clock)
    tickets = [book.issue("k") for _ in range(4)]
    for ticket in tickets[:3]:
        book.verify(ticket)
    with pytest.raises(SluiceError) as excinfo:
        book.verify(tickets[3])
    assert excinfo.value.code is ErrorCode.OVERLOADED
    assert excinfo.value.retry_after_ms is not None and excinfo.value.retry_after_ms > 0
    clock.now += 11
    fresh = book.issue("k")
    assert book.verify(fresh).key_id == "k"
    assert book.used_count == 1


# Origins.


@pytest.mark.parametrize(
    ("origin", "host", "scheme", "allowed"),
    [
        (None, "example.com", "http", True),  # non-browser client
        ("http://localhost:5173", "example.com", "http", True),
        ("http://localhost", "example.com", "http", True),
        ("http://127.0.0.1:9999", "example.com", "http", True),
        ("http://[::1]:3000", "example.com", "http", True),
        ("https://localhost:5173", "example.com", "http", False),  # only http is defaulted
        ("http://example.com:8000", "example.com:8000", "http", True),  # own origin
        ("HTTP://Example.COM:8000", "example.com:8000", "ws", True),
        ("https://example.com", "example.com", "wss", True),  # default port filled in
        ("https://example.com:443", "example.com", "https", True),
        ("http://example.com", "example.com", "https", False),  # scheme differs
        ("http://example.com:8001", "example.com:8000", "http", False),
        ("https://evil.example", "example.com", "http", False),
        ("http://localhost.evil.example", "example.com", "http", False),
        ("null", "example.com", "http", False),
        ("http://example.com:8000/path", "example.com:8000", "http", False),
        ("not a url", "example.com", "http", False),
        ("http://evil.example", None, "http", False),
    ],
)
def test_default_origin_policy(origin: str | None, host: str | None, scheme: str, allowed: bool) -> None:
    auth, _ = make()
    assert auth.check_origin(origin, host, scheme) is allowed


def test_configured_origins_replace_the_localhost_defaults() -> None:
    policy = OriginPolicy(["https://app.example.com", "http://dev.example.com:*", "null"])
    assert policy.allows("https://app.example.com", "api.example.com")
    assert policy.allows("https://app.example.com:443", "api.example.com")
    assert not policy.allows("https://app.example.com:8443", "api.example.com")
    assert policy.allows("http://dev.example.com:1234", "api.example.com")
    assert policy.allows("http://dev.example.com", "api.example.com")
    assert not policy.allows("https://dev.example.com:1234", "api.example.com")
    assert policy.allows("null", "api.example.com")
    assert not policy.allows("http://localhost:5173", "api.example.com")
    assert policy.allows("http://api.example.com", "api.example.com")  # own origin stays allowed
    assert policy.allows(None, None)


def test_star_allows_any_origin_and_bad_entries_fail_fast() -> None:
    assert OriginPolicy(["*"]).allows("https://anything.example", "example.com")
    with pytest.raises(ValueError):
        OriginPolicy(["example.com"])
    with pytest.raises(ValueError):
        OriginPolicy(["ftp://example.com"])
