"""CORS for the HTTP APIs, from the same Origin allow-list as the WebSocket and SSE transports.

Starlette's `CORSMiddleware` does the header work; only the decision "is this origin allowed" is
replaced, so that ``SLUICE_ALLOWED_ORIGINS`` (exact origins, ``scheme://host:*``, ``*``) means
the same thing everywhere. Same-origin requests need no CORS headers, so no Host is consulted.
No credentials (cookies) are involved: callers authenticate with ``Authorization`` or tickets.
"""

from __future__ import annotations

from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp

from server.auth import OriginPolicy

__all__ = ["PolicyCORSMiddleware"]

_METHODS = ("GET", "POST", "DELETE", "OPTIONS")
_HEADERS = ("Authorization", "Content-Type", "Last-Event-ID", "Accept")


class PolicyCORSMiddleware(CORSMiddleware):
    def __init__(self, app: ASGIApp, policy: OriginPolicy) -> None:
        super().__init__(
            app,
            allow_origins=("*",) if policy.allow_any else (),
            allow_methods=_METHODS,
            allow_headers=_HEADERS,
            expose_headers=("Retry-After",),
            max_age=600,
        )
        self.policy = policy

    def is_allowed_origin(self, origin: str) -> bool:
        return self.policy.allows(origin, None)
