"""Python arguments → protocol requests, checked before they are sent.

The request models are ``protocol.messages``' own, so a request the server would refuse as
invalid is refused here first, as a `SluiceError` with code ``invalid_message`` naming the field —
except Python misuse (an unknown option name, or one given twice), which is a ``TypeError`` like
any other call. Ids are made here too: short, readable in server logs, unique within the client.
Nothing here sends.
"""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final, Literal

from pydantic import ValidationError

from protocol.messages import MAX_INPUTS, ChatMessage, Classify, Embed, Generate, GenerateOptions
from protocol.tools import NamedToolChoice, Tool, ToolChoice
from sluice_client.errors import SluiceError, invalid_argument

__all__ = [
    "FormatLike",
    "MessageLike",
    "OptionsLike",
    "RequestIds",
    "ToolChoiceLike",
    "ToolLike",
    "check_batch_size",
    "classify_request",
    "embed_request",
    "generate_options",
    "generate_request",
    "text_list",
]

# A message as a model or as a dict in its wire shape (``tool_calls`` of an assistant turn too).
MessageLike = ChatMessage | Mapping[str, Any]
OptionsLike = GenerateOptions | Mapping[str, Any]
# "json", or a JSON Schema the reply must be an instance of.
FormatLike = Literal["json"] | Mapping[str, Any]
# ``{"type": "function", "function": {"name", "description"?, "parameters"?}}`` (OpenAI's shape).
ToolLike = Tool | Mapping[str, Any]
# "auto", "none", "required", or ``{"type": "function", "function": {"name": ...}}``.
ToolChoiceLike = Literal["auto", "none", "required"] | NamedToolChoice | Mapping[str, Any]
_OPTION_NAMES: Final = frozenset(GenerateOptions.model_fields)
# What the ``ollama`` package's users call some of them, for the error naming an unknown option.
_OLLAMA_NAMES: Final = {"num_predict": "max_tokens"}


class RequestIds:
    """``g-3f2a-17``: a kind letter, a per-client tag, a counter."""

    def __init__(self) -> None:
        self._tag = secrets.token_hex(2)
        self._counter = itertools.count(1)

    def next(self, kind: Literal["g", "e", "c"]) -> str:
        return f"{kind}-{self._tag}-{next(self._counter)}"


def _invalid(exc: ValidationError, prefix: str | None = None) -> SluiceError:
    first = exc.errors(include_url=False, include_input=False)[0]
    where = ".".join(str(part) for part in ([prefix] if prefix else []) + list(first["loc"])) or "request"
    return invalid_argument(f"invalid {where}: {str(first['msg']).removeprefix('Value error, ')}")


def _json_ready(value: Any) -> Any:
    """Mappings as dicts and tuples as lists, all the way down: the protocol's models are strict."""
    if isinstance(value, Mapping):
        return {key: _json_ready(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(item) for item in value]
    return value


def _chat_messages(messages: Iterable[MessageLike]) -> list[ChatMessage]:
    out = []
    for message in messages:
        out.append(
            message if isinstance(message, ChatMessage) else ChatMessage.model_validate(_json_ready(message))
        )
    return out


def generate_options(options: OptionsLike | None, keywords: Mapping[str, Any]) -> GenerateOptions:
    """``options={...}`` (as the ``ollama`` package passes them) merged with keyword options.

    An unknown name, or one given both ways, is a ``TypeError`` naming it; a bad value is a
    `SluiceError` (``invalid_message``) naming the option.
    """
    if isinstance(options, GenerateOptions):
        given: dict[str, Any] = options.model_dump(exclude_none=True)
    elif options is None:
        given = {}
    elif isinstance(options, Mapping):
        given = dict(options)
    else:
        raise TypeError(f"options must be a dict of generate options, not {type(options).__name__}")
    _check_names(given, "options")
    _check_names(keywords, "keyword")
    twice = sorted(set(given) & set(keywords))
    if twice:
        raise TypeError(f"generate option(s) given both in options= and as keywords: {', '.join(twice)}")
    plain = given | dict(keywords)
    stop = plain.get("stop")
    if isinstance(stop, str):
        plain["stop"] = [stop]
    elif isinstance(stop, tuple):
        plain["stop"] = list(stop)
    try:
        return GenerateOptions.model_validate(plain)
    except ValidationError as exc:
        raise _invalid(exc, prefix="options") from None


def _check_names(options: Mapping[str, Any], how: Literal["options", "keyword"]) -> None:
    unknown = sorted(str(name) for name in set(options) - _OPTION_NAMES)
    if not unknown:
        return
    hints = [f"{name} is called {_OLLAMA_NAMES[name]} here" for name in unknown if name in _OLLAMA_NAMES]
    where = "in options=" if how == "options" else "keyword"
    raise TypeError(
        f"unknown generate option(s) {where}: {', '.join(unknown)} "
        f"(known: {', '.join(sorted(_OPTION_NAMES))}{'; ' + '; '.join(hints) if hints else ''})"
    )


def generate_request(
    request_id: str,
    *,
    prompt: str | None,
    messages: Iterable[MessageLike] | None,
    model: str | None,
    system: str | None,
    history: bool,
    format: FormatLike | None,
    tools: Iterable[ToolLike] | None,
    tool_choice: ToolChoiceLike | None,
    options: GenerateOptions,
) -> Generate:
    if isinstance(tools, str | Mapping):
        raise TypeError("tools must be a list of tools, not one tool")
    try:
        return Generate(
            type="generate",
            id=request_id,
            prompt=prompt,
            messages=None if messages is None else _chat_messages(messages),
            model=model,
            system=system,
            history=history,
            format=format if isinstance(format, str | None) else _json_ready(format),
            tools=None if tools is None else [_json_ready(tool) for tool in tools],
            tool_choice=_tool_choice(tool_choice),
            options=options,
        )
    except ValidationError as exc:
        raise _invalid(exc) from None


def _tool_choice(choice: ToolChoiceLike | None) -> ToolChoice | None:
    """``choice`` checked on its own, so a mistake gets an error about the shape it was meant to be."""
    if choice is None or isinstance(choice, NamedToolChoice):
        return choice
    if isinstance(choice, str):
        if choice == "auto" or choice == "none" or choice == "required":
            return choice
        raise invalid_argument(
            f"invalid tool_choice: {choice!r} is not 'auto', 'none' or 'required' (to make the model call "
            f"one tool, pass {{'type': 'function', 'function': {{'name': {choice!r}}}}})"
        )
    try:
        return NamedToolChoice.model_validate(_json_ready(choice))
    except ValidationError as exc:
        raise _invalid(exc, prefix="tool_choice") from None


def text_list(texts: str | Sequence[str]) -> list[str]:
    items = [texts] if isinstance(texts, str) else list(texts)
    for index, text in enumerate(items):
        if not isinstance(text, str):
            raise TypeError(f"texts[{index}] is {type(text).__name__}, not str")
    return items


def check_batch_size(batch_size: int) -> None:
    if not 1 <= batch_size <= MAX_INPUTS:
        raise ValueError(f"batch_size must be between 1 and {MAX_INPUTS}")


def embed_request(request_id: str, texts: list[str], *, model: str | None, normalize: bool) -> Embed:
    try:
        return Embed(
            type="embed", id=request_id, input=texts, model=model, normalize=normalize, encoding="base64"
        )
    except ValidationError as exc:
        raise _invalid(exc) from None


def classify_request(
    request_id: str, texts: list[str], labels: Sequence[str], *, multi_label: bool, model: str | None
) -> Classify:
    try:
        return Classify(
            type="classify",
            id=request_id,
            input=texts,
            labels=list(labels),
            multi_label=multi_label,
            model=model,
        )
    except ValidationError as exc:
        raise _invalid(exc) from None
