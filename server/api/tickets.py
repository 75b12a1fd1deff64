"""``POST /v1/tickets``: trade an API key for a short-lived, single-use ticket (`server.tickets`).

Browsers cannot set headers on a WebSocket or an ``EventSource``, so they send their key once,
here, in an ``Authorization`` header, and carry the ticket in the URL (``?ticket=``). With auth
off it still issues a ticket (for the anonymous principal), so browser code need not know whether
auth is on. The route authenticates itself (it needs the principal, not only its ``key_id``).
"""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from server.api.errors import Family
from server.api.routing import api_router
from server.services import services_of

__all__ = ["TicketRequest", "router"]

router = api_router(Family.SLUICE, authenticate=False, tags=["auth"])


class TicketRequest(BaseModel):
    """Optional body of ``POST /v1/tickets``: bind the ticket to one session."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    session: str | None = Field(default=None, min_length=1, max_length=128)


@router.post("/v1/tickets", summary="Trade the Authorization: Bearer key for a single-use ticket")
async def create_ticket(request: Request, body: TicketRequest | None = None) -> JSONResponse:
    auth = services_of(request).auth
    principal = auth.authenticate(authorization=request.headers.get("authorization"))
    ticket, expires_in_s = auth.issue_ticket(principal, session=body.session if body is not None else None)
    return JSONResponse(
        {"ticket": ticket, "expires_in_s": expires_in_s},
        headers={"Cache-Control": "no-store"},
    )
