"""Errors as HTTP answers: every code has a status, each family its body shape."""

from __future__ import annotations

import orjson
import pytest

from protocol.errors import ErrorCode, SluiceError
from server.api.errors import (
    Family,
    StatusError,
    error_body,
    error_response,
    field_of,
    invalid_body,
    status_for,
)


@pytest.mark.parametrize("code", list(ErrorCode))
def test_every_code_has_a_status(code: ErrorCode) -> None:
    status = status_for(code)
    assert 400 <= status < 600
    # Only failures of the server itself are 5xx; what a client sent wrong never is.
    server_side = {
        ErrorCode.UPSTREAM_UNAVAILABLE,
        ErrorCode.UPSTREAM_ERROR,
        ErrorCode.OVERLOADED,
        ErrorCode.TIMEOUT,
        ErrorCode.SLOW_CONSUMER,
        ErrorCode.SHUTTING_DOWN,
        ErrorCode.INTERNAL,
    }
    assert (status >= 500) == (code in server_side)


def test_family_shapes() -> None:
    error = SluiceError(ErrorCode.RATE_LIMITED, "slow down", retry_after_ms=1500, ref="r1")
    assert error_body(Family.SLUICE, error, status=429) == {
        "error": {
            "code": "rate_limited",
            "message": "slow down",
            "retryable": True,
            "retry_after_ms": 1500,
            "ref": "r1",
        }
    }
    assert error_body(Family.OPENAI, error, status=429, field="model") == {
        "error": {
            "message": "slow down",
            "type": "rate_limit_error",
            "param": "model",
            "code": "rate_limited",
        }
    }
    assert error_body(Family.OLLAMA, error, status=429) == {"error": "slow down"}
    response = error_response(Family.OPENAI, error)
    assert response.status_code == 429 and response.headers["retry-after"] == "2"
    unauthorized = error_response(Family.SLUICE, SluiceError(ErrorCode.UNAUTHORIZED, "key"))
    assert unauthorized.status_code == 401 and unauthorized.headers["www-authenticate"] == "Bearer"
    assert (
        error_response(Family.SLUICE, StatusError(410, ErrorCode.INVALID_REQUEST, "gone")).status_code == 410
    )


@pytest.mark.parametrize(
    ("loc", "field"),
    [
        (("body", "messages", 0, "content"), "messages[0].content"),
        (("body", "input", "list[str]", 1), "input[1]"),
        (("body", "input", "str"), "input"),
        (("body",), "body"),
        (("query", "last_event_id"), "last_event_id"),
        (("header", "last-event-id"), "last-event-id"),
    ],
)
def test_field_of(loc: tuple[int | str, ...], field: str) -> None:
    assert field_of(loc) == field


def test_invalid_body_names_the_field_and_never_echoes_input() -> None:
    errors = [{"loc": ("body", "texts", 0), "msg": "Input should be a valid string", "input": "SECRET" * 100}]
    response = invalid_body(Family.SLUICE, errors)
    body = orjson.loads(response.body)
    assert response.status_code == 422
    assert body["error"]["field"] == "texts[0]" and "SECRET" not in body["error"]["message"]
