"""What travels between nodes for a session: client messages, refusals and their outcomes.

A node that holds a session's transport but is not its home forwards each client message to the
home as plain JSON fields (`dump`, decoded again there by `load`, through the same codec as any
client frame), a refusal of a frame that did not decode as its fields (`refusal_fields`,
`refusal_error`), and for an SSE ``POST`` gets back what became of each message
(`answer_of` at the home, `outcome_of` at the node that asked). Pure: no I/O, no state.
"""

from __future__ import annotations

from typing import Any

import orjson

from protocol.codec import decode, encode
from protocol.errors import ErrorCode, SluiceError
from protocol.messages import Classify, ClientMessage, Embed, Error, Generate
from protocol.session import Accepted, Ignored, Outcome, Refused
from server.cluster.eventlog import decode_event

__all__ = ["answer_of", "dump", "load", "outcome_of", "refusal_error", "refusal_fields"]

# Forwarded messages were checked at the node that took them; this only bounds the decoder.
_FORWARDED_MAX_BYTES = 1 << 30
_IGNORED = Ignored()


def dump(message: ClientMessage) -> dict[str, Any]:
    """A client message as the fields its sender set (so the home decodes the same message)."""
    return message.model_dump(mode="json", exclude_unset=True)


def load(fields: dict[str, Any]) -> ClientMessage:
    return decode(orjson.dumps(fields), max_bytes=_FORWARDED_MAX_BYTES)


def refusal_fields(error: SluiceError) -> dict[str, Any]:
    return {
        "code": error.code.value,
        "message": error.message,
        "retryable": error.retryable,
        "retry_after_ms": error.retry_after_ms,
        "ref": error.ref,
    }


def refusal_error(fields: dict[str, Any]) -> SluiceError:
    return SluiceError(
        ErrorCode(fields["code"]),
        fields["message"],
        retryable=fields["retryable"],
        retry_after_ms=fields["retry_after_ms"],
        ref=fields["ref"],
    )


def answer_of(outcome: Outcome) -> dict[str, Any]:
    """An `Outcome` as the home sends it back to the node that took the message."""
    match outcome:
        case Accepted():
            return {"accepted": True}
        case Refused(event=event):
            return {"refused": encode(event)}
        case _:
            return {}


def outcome_of(message: ClientMessage, answer: dict[str, Any]) -> Outcome:
    """The `Outcome` of ``message`` from the home's `answer_of` it."""
    if answer.get("accepted") and isinstance(message, Generate | Embed | Classify):
        return Accepted(message)
    refused = answer.get("refused")
    if refused is not None:
        event = decode_event(refused)
        assert isinstance(event, Error)
        return Refused(event)
    return _IGNORED
