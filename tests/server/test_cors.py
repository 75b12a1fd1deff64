"""CORS on the HTTP APIs follows SLUICE_ALLOWED_ORIGINS, like the WebSocket and SSE transports."""

from __future__ import annotations

import httpx

from server.app import create_app
from server.settings import Settings
from tests.server.fakes import FakeRegistry


def _client(origins: list[str]) -> httpx.AsyncClient:
    settings = Settings(allowed_origins=origins, ollama_urls=[])
    app = create_app(settings, registry=FakeRegistry())
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sluice.test")


async def test_preflight_allowed_origin_gets_cors_headers() -> None:
    async with _client(["https://chat.example.com"]) as client:
        response = await client.options(
            "/v1/embeddings",
            headers={
                "Origin": "https://chat.example.com",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "https://chat.example.com"
    assert "POST" in response.headers["access-control-allow-methods"]
    assert "authorization" in response.headers["access-control-allow-headers"].lower()


async def test_preflight_foreign_origin_is_refused() -> None:
    async with _client(["https://chat.example.com"]) as client:
        response = await client.options(
            "/v1/embeddings",
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
        )
    assert response.status_code == 400
    assert "access-control-allow-origin" not in response.headers


async def test_simple_request_from_localhost_port_by_default() -> None:
    async with _client([]) as client:
        response = await client.get("/health", headers={"Origin": "http://localhost:5173"})
        foreign = await client.get("/health", headers={"Origin": "http://evil.example"})
    assert response.headers["access-control-allow-origin"] == "http://localhost:5173"
    assert "access-control-allow-origin" not in foreign.headers
