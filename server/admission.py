"""Who may open or use a session connection: one check for both transports, as Starlette writes
`HTTPConnection` once for requests and websockets.

`admit` looks at what the connection itself carries, before anything is read from it: the drain
state (a server going away takes no new connections), the ``Origin`` (a foreign page is refused)
and the credentials of the handshake (an ``Authorization: Bearer`` header or a ``?ticket=``).
Without either, and with auth on, the caller must still authenticate with the token of its first
message (the WebSocket ``hello``, the body of ``POST /v1/sessions``): `Admission.key_for` does
that, checks that a ticket bound to one session is used for that session, and gives the
``key_id`` everything after counts against. Each transport turns a refusal into its own answer
(a close code, an HTTP status). This module never reads a body or a frame and never sends.
"""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import HTTPConnection

from protocol.errors import ErrorCode, SluiceError
from server.auth import Principal, key_id_for
from server.services import Services

__all__ = ["Admission", "admit"]


@dataclass(frozen=True, slots=True)
class Admission:
    """A connection that passed `admit`; ``verified``: its credentials were checked (or auth is
    off), so no token is needed from its first message."""

    services: Services
    principal: Principal | None
    verified: bool

    def key_for(self, *, session: str | None, token: str | None = None) -> str:
        """The caller's ``key_id`` for using ``session`` (None: a new one), authenticating with
        ``token`` when the handshake carried no credentials. Raises ``SluiceError(unauthorized)``."""
        principal = self.principal
        if not self.verified:
            principal = self.services.auth.authenticate(hello_token=token, session=session)
        if principal is not None and not principal.allows_session(session):
            raise SluiceError(ErrorCode.UNAUTHORIZED, "ticket is bound to another session")
        return key_id_for(principal)


def admit(connection: HTTPConnection, services: Services, *, opening: bool = True) -> Admission:
    """Check ``connection`` (drain state when ``opening`` a connection or session, origin,
    handshake credentials). Raises `SluiceError`: ``shutting_down``, ``forbidden`` (origin) or
    ``unauthorized``. A ticket is used up here."""
    if opening:
        services.drain.check()
    headers = connection.headers
    scheme = "https" if connection.url.scheme in ("https", "wss") else "http"
    if not services.auth.check_origin(headers.get("origin"), headers.get("host"), scheme):
        raise SluiceError(ErrorCode.FORBIDDEN, "origin not allowed")
    authorization = headers.get("authorization")
    ticket = connection.query_params.get("ticket")
    if authorization or ticket:
        principal = services.auth.authenticate(authorization=authorization, ticket=ticket)
        return Admission(services, principal, verified=True)
    return Admission(services, None, verified=not services.auth.auth_required)
