"""Routers whose routes answer every failure in their API family's shape, and authenticate first.

`api_router(family)` gives an `APIRouter` whose route class wraps each endpoint once:

1. with ``authenticate`` on, the ``Authorization: Bearer <key>`` header is checked before the body
   is even read (401 comes before 422), and the caller's ``key_id`` is left for `caller_key`;
2. a body that fails validation becomes 422 naming the field, a `SluiceError` its typed answer,
   and anything unexpected is logged and answered ``internal`` (500, no exception text): a
   request can never surface a traceback or a bare framework error.

The `bearer` security scheme is declared on authenticated routers so ``/docs`` shows how to call
them; the check itself is step 1. Errors after a streaming response has started are the
streaming code's to report (inside the stream). This module never reads the environment.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any, ClassVar

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPBearer
from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.types import Scope

from protocol.errors import ErrorCode, SluiceError
from server.api.calls import ClientGone
from server.api.errors import (
    ErrorBody,
    Family,
    OllamaErrorBody,
    OpenAIErrorBody,
    error_response,
    invalid_body,
    validation_errors,
)
from server.auth import key_id_for
from server.services import services_of

__all__ = ["api_router", "bearer", "caller_key", "error_model"]

log = logging.getLogger("sluice.api")

# Declares the scheme for the OpenAPI document only (auto_error off): `_FamilyRoute` checks keys.
bearer = HTTPBearer(auto_error=False, scheme_name="sluice API key", description="Authorization: Bearer <key>")

_KEY_ATTRIBUTE = "sluice_key_id"

_ERROR_MODELS: dict[Family, type[Any]] = {
    Family.SLUICE: ErrorBody,
    Family.OPENAI: OpenAIErrorBody,
    Family.OLLAMA: OllamaErrorBody,
}


def error_model(family: Family) -> type[Any]:
    """The error body model of ``family``, for ``responses=`` in route declarations."""
    return _ERROR_MODELS[family]


def caller_key(request: Request) -> str:
    """The ``key_id`` of the authenticated caller (``anonymous`` while auth is off)."""
    key_id = getattr(request.state, _KEY_ATTRIBUTE, None)
    if not isinstance(key_id, str):
        raise RuntimeError("caller_key used on a route that does not authenticate")
    return key_id


def _http_error(exc: HTTPException) -> SluiceError:
    # Raised by the framework itself (a body it could not parse), never with anything secret.
    if exc.status_code >= 500:
        return SluiceError.internal()
    code = {401: ErrorCode.UNAUTHORIZED, 403: ErrorCode.FORBIDDEN, 413: ErrorCode.MESSAGE_TOO_LARGE}.get(
        exc.status_code, ErrorCode.INVALID_REQUEST
    )
    detail = exc.detail if isinstance(exc.detail, str) else "the request could not be processed"
    return SluiceError(code, detail)


def _body_is_json(scope: Scope) -> None:
    """Declare the body JSON whatever the client said (``curl -d`` says form-encoded)."""
    headers = [(name, value) for name, value in scope["headers"] if name != b"content-type"]
    scope["headers"] = [*headers, (b"content-type", b"application/json")]


class _FamilyRoute(APIRoute):
    family: ClassVar[Family] = Family.SLUICE
    authenticate: ClassVar[bool] = True
    any_content_type: ClassVar[bool] = False

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        family, authenticate, path = self.family, self.authenticate, self.path
        any_content_type = self.any_content_type

        async def route(request: Request) -> Response:
            if any_content_type:
                _body_is_json(request.scope)  # before anything reads the headers
            try:
                if authenticate:
                    services = services_of(request)
                    principal = services.auth.authenticate(authorization=request.headers.get("authorization"))
                    setattr(request.state, _KEY_ATTRIBUTE, key_id_for(principal))
                return await handler(request)
            except ClientGone:
                # Nobody is left to read an answer; the work was cancelled already.
                return Response(status_code=499)
            except RequestValidationError as exc:
                return invalid_body(family, list(exc.errors()))
            except ValidationError as exc:  # a protocol model built from an already valid body
                return invalid_body(family, validation_errors(exc))
            except SluiceError as exc:
                return error_response(family, exc)
            except HTTPException as exc:
                return error_response(family, _http_error(exc), status=exc.status_code)
            except Exception:
                log.exception("%s %s failed", request.method, path)
                return error_response(family, SluiceError.internal())

        return route


def api_router(
    family: Family, *, authenticate: bool = True, any_content_type: bool = False, **kwargs: Any
) -> APIRouter:
    """A router for ``family``'s routes; see the module docstring. With ``any_content_type`` a
    body is parsed as JSON whatever its ``Content-Type`` (as Ollama does). ``kwargs`` go to
    `APIRouter`."""
    route_class = type(
        f"{family.value.title()}Route",
        (_FamilyRoute,),
        {"family": family, "authenticate": authenticate, "any_content_type": any_content_type},
    )
    dependencies = list(kwargs.pop("dependencies", []))
    if authenticate:
        dependencies.append(Depends(bearer))
    return APIRouter(route_class=route_class, dependencies=dependencies, **kwargs)
