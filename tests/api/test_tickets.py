"""``POST /v1/tickets`` (`server.api.tickets`) on a real app, through its ASGI interface."""

from __future__ import annotations

import hashlib
import logging

import httpx
import pytest
from fastapi import FastAPI

from server.app import create_app
from server.auth import Authenticator, Principal
from server.services import Services
from server.settings import Settings
from tests.server.fakes import FakeRegistry

KEY = "sk-test-0123456789"
KEY_ID = hashlib.sha256(KEY.encode()).hexdigest()[:12]


def _app(api_keys: list[str]) -> tuple[FastAPI, Authenticator]:
    app = create_app(Settings(api_keys=api_keys), registry=FakeRegistry())
    return app, services_of_app(app).auth


def services_of_app(app: FastAPI) -> Services:
    services = app.state.sluice
    assert isinstance(services, Services)
    return services


async def test_tickets_route_issues_a_ticket_for_a_valid_key(caplog: pytest.LogCaptureFixture) -> None:
    app, authenticator = _app([KEY])
    caplog.set_level(logging.DEBUG)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.post("/v1/tickets", headers={"Authorization": f"Bearer {KEY}"})
        bound = await client.post(
            "/v1/tickets", headers={"Authorization": f"Bearer {KEY}"}, json={"session": "s-9"}
        )
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"ticket", "expires_in_s"} and body["expires_in_s"] == 60
    assert response.headers["cache-control"] == "no-store"
    assert authenticator.authenticate(ticket=body["ticket"]) == Principal(KEY_ID)
    assert bound.status_code == 200
    assert authenticator.authenticate(ticket=bound.json()["ticket"]) == Principal(KEY_ID, session="s-9")
    assert KEY not in caplog.text


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}])
async def test_tickets_route_refuses_without_a_valid_key(headers: dict[str, str]) -> None:
    app, _ = _app([KEY])
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.post("/v1/tickets", headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    error = response.json()["error"]
    assert error["code"] == "unauthorized" and error["retryable"] is False and error["message"]


async def test_tickets_route_with_auth_off_issues_anonymous_tickets() -> None:
    app, authenticator = _app([])
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.post("/v1/tickets")
    assert response.status_code == 200
    assert response.json()["ticket"]
    assert authenticator.authenticate(ticket=response.json()["ticket"]) is None
