"""``GET /schema.json`` and ``GET /asyncapi.json``: the committed contract files, served as they are.

The files are the ones `protocol.schema` generates and the repository commits (a test keeps them
equal to the code), read once from the installed ``protocol`` package and served byte for byte,
so what a client downloads is exactly what the TypeScript types and the conformance suite use.
They are public: a contract is no secret, and tools fetch it before they hold a key.
"""

from __future__ import annotations

from functools import cache
from typing import Any, Final

from fastapi.responses import Response

from protocol.schema import ASYNCAPI_FILE, DEFAULT_DIRECTORY, SCHEMA_FILE
from server.api.errors import Family
from server.api.routing import api_router

__all__ = ["router"]

_CONTENT: Final[dict[int | str, dict[str, Any]]] = {
    200: {"content": {"application/json": {"schema": {"type": "object"}}}}
}

router = api_router(Family.SLUICE, authenticate=False, tags=["contract"])


@cache
def _read(name: str) -> bytes:
    return (DEFAULT_DIRECTORY / name).read_bytes()


@router.get("/schema.json", responses=_CONTENT, summary="JSON Schema of every protocol message")
async def schema() -> Response:
    return Response(_read(SCHEMA_FILE), media_type="application/json")


@router.get(
    "/asyncapi.json", responses=_CONTENT, summary="AsyncAPI 3.0 document of the WebSocket and SSE channels"
)
async def asyncapi() -> Response:
    return Response(_read(ASYNCAPI_FILE), media_type="application/json")
