"""Keys, tickets, origins and rate limits on the SSE transport and the plain HTTP APIs.

A server of its own, with API keys, an origin allow-list and a request rate per key.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import httpx
import openai
import pytest

from tests.api.conftest import MODEL, sluice
from tests.support.ollama_emulator import Emulator
from tests.support.server import ServerProcess
from tests.transports.sse.session_helpers import EventStream

pytestmark = pytest.mark.timeout(120)

KEY_A, KEY_B, KEY_RATE = "key-a-secret", "key-b-secret", "key-rate-secret"
RATE = 30


@pytest.fixture(scope="module")
def secured(emulator: Emulator) -> Iterator[ServerProcess]:
    env = {
        "SLUICE_OLLAMA_URLS": emulator.url,
        "SLUICE_API_KEYS": f"{KEY_A},{KEY_B},{KEY_RATE}",
        "SLUICE_ALLOWED_ORIGINS": "https://app.example",
        "SLUICE_REQUESTS_PER_MINUTE": str(RATE),
    }
    with sluice(env) as process:
        yield process


@pytest.fixture
async def anonymous(secured: ServerProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=secured.url, timeout=30.0) as http:
        yield http


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_plain_apis_need_a_key_and_answer_in_their_family_shape(anonymous: httpx.AsyncClient) -> None:
    generate = {"model": MODEL, "prompt": "x", "max_tokens": 2}
    seed = await anonymous.post("/api/v1/generate", json=generate)
    assert seed.status_code == 401 and seed.json()["error"]["code"] == "unauthorized"
    assert seed.headers["www-authenticate"] == "Bearer"
    ollama = await anonymous.post("/api/generate", json=generate | {"stream": False})
    assert ollama.status_code == 401 and isinstance(ollama.json()["error"], str)
    # A wrong key is refused before the body is even looked at (401, not 422).
    wrong = await anonymous.post("/api/v1/embeddings", json={"texts": 5}, headers=_bearer("nope"))
    assert wrong.status_code == 401
    ok = await anonymous.post("/api/v1/generate", json=generate, headers=_bearer(KEY_A))
    assert ok.status_code == 200
    for public in ("/api/version", "/schema.json", "/asyncapi.json"):
        assert (await anonymous.get(public)).status_code == 200


async def test_openai_sdk_with_and_without_a_key(secured: ServerProcess) -> None:
    async with openai.AsyncOpenAI(base_url=f"{secured.url}/v1", api_key="wrong", max_retries=0) as sdk:
        with pytest.raises(openai.AuthenticationError) as refused:
            await sdk.models.list()
    assert refused.value.code == "unauthorized"
    async with openai.AsyncOpenAI(base_url=f"{secured.url}/v1", api_key=KEY_A, max_retries=0) as sdk:
        assert [model.id async for model in sdk.models.list()]


async def test_sse_session_with_tickets(anonymous: httpx.AsyncClient) -> None:
    assert (await anonymous.post("/v1/sessions", json={})).status_code == 401
    opened = await anonymous.post("/v1/sessions", json={"token": KEY_A})
    assert opened.status_code == 201
    session = opened.json()["session"]
    # Browsers trade their key for a single-use ticket that may travel in the URL.
    ticket = (await anonymous.post("/v1/tickets", headers=_bearer(KEY_A), json={"session": session})).json()[
        "ticket"
    ]
    async with EventStream(anonymous, session, headers={}) as no_credentials:
        assert await no_credentials.opened() == 401
    stream = EventStream(anonymous, session, params={"ticket": ticket})
    assert await stream.opened() == 200
    posted = await anonymous.post(
        f"/v1/sessions/{session}/messages",
        json={"type": "embed", "id": "e", "input": "ticketed"},
        headers=_bearer(KEY_A),
    )
    assert posted.status_code == 202
    await stream.until(lambda: stream.terminal("e") is not None)
    await stream.close()
    async with EventStream(anonymous, session, params={"ticket": ticket}) as reused:
        assert await reused.opened() == 401
    # Another key cannot see the session at all.
    other = await anonymous.post(
        f"/v1/sessions/{session}/messages", json={"type": "ping"}, headers=_bearer(KEY_B)
    )
    assert other.status_code == 404
    resumed = await anonymous.post(
        "/v1/sessions", json={"session": session, "last_seq": 1}, headers=_bearer(KEY_B)
    )
    assert resumed.status_code == 201 and resumed.json()["resumed"] is False
    bound = (await anonymous.post("/v1/tickets", headers=_bearer(KEY_A), json={"session": "s_other"})).json()[
        "ticket"
    ]
    async with EventStream(anonymous, session, params={"ticket": bound}) as elsewhere:
        assert await elsewhere.opened() == 401
    assert (await anonymous.delete(f"/v1/sessions/{session}", headers=_bearer(KEY_A))).status_code == 204


async def test_origin_allow_list(anonymous: httpx.AsyncClient) -> None:
    allowed = {"Origin": "https://app.example"} | _bearer(KEY_A)
    assert (await anonymous.post("/v1/sessions", json={}, headers=allowed)).status_code == 201
    # With an explicit list, localhost is no longer allowed by default.
    foreign = {"Origin": "http://localhost:3000"} | _bearer(KEY_A)
    refused = await anonymous.post("/v1/sessions", json={}, headers=foreign)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "forbidden"


async def test_request_rate_per_key(anonymous: httpx.AsyncClient) -> None:
    body = {"model": MODEL, "prompt": "rate", "max_tokens": 1}
    statuses = [
        (await anonymous.post("/api/v1/generate", json=body, headers=_bearer(KEY_RATE))).status_code
        for _ in range(RATE)
    ]
    assert statuses == [200] * RATE
    limited = await anonymous.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]},
        headers=_bearer(KEY_RATE),
    )
    assert limited.status_code == 429
    error = limited.json()["error"]
    assert error["code"] == "rate_limited" and error["type"] == "rate_limit_error"
    assert int(limited.headers["retry-after"]) >= 1
    # Limits are per key: another key is unaffected.
    assert (await anonymous.post("/api/v1/generate", json=body, headers=_bearer(KEY_B))).status_code == 200
