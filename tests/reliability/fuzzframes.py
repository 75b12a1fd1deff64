"""Fuzzed client frames: valid, mutated, near-valid and garbage input for the decoder and the server.

`FrameFuzzer(seed, max_bytes=...)` yields `Frame`s from a seeded `random.Random`, so a failing
frame is reproduced by its seed and index. Each frame is one of the `KINDS`:

- ``valid``: a well-formed client message of any type (random ids, unicode, options at their
  bounds), which the server must handle as usual;
- ``mutated``: a valid message with fields deleted, retyped, renamed or nested;
- ``near``: a valid message's JSON text with characters cut, inserted, swapped or repeated;
- ``garbage``: random bytes or text, whitespace, empty frames, JSON that is not an object;
- ``deep``: arrays and objects nested past (and just under) the JSON parser's depth limit;
- ``number``: huge, tiny, negative, fractional and out-of-range numbers in numeric fields;
- ``oversize``: frames just under, at and past ``max_bytes``, multi-byte characters at the edge;
- ``bad_utf8``: bytes that are not UTF-8 (overlong forms, lone continuation bytes, encoded
  surrogates, truncated sequences) — only as bytes, since a text frame must be UTF-8;
- ``surrogate``: Python strings holding lone surrogates (in-process only: they cannot be encoded).

Nothing here sends or decodes anything; the tests and the socket fuzzer do.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final

import orjson

__all__ = ["KINDS", "Frame", "FrameFuzzer"]

KINDS: Final = (
    "valid",
    "mutated",
    "near",
    "garbage",
    "deep",
    "number",
    "oversize",
    "bad_utf8",
    "surrogate",
)
# Relative weights: most frames are close to valid, where the decoder's decisions are subtle.
_WEIGHTS: Final = (20, 25, 20, 10, 4, 8, 4, 6, 3)

TYPES: Final = ("hello", "generate", "embed", "classify", "cancel", "ping", "ack")
_FIELDS: Final = (
    "type id model prompt messages system options format history input normalize encoding labels "
    "multi_label nonce seq protocol session last_seq token client temperature top_p top_k "
    "max_tokens stop seed role content"
).split()
_ODD_TEXT: Final = (
    "",
    " ",
    "\u0000",
    "\t\n",
    "é",
    "東京",
    "😀",
    "\u202e",
    "\ufeff",
    "a" * 64,
    "a" * 65,
    "null",
    "[]",
    "{}",
    '"',
    "\\",
    "\ud7ff",
    "\ue000",
)
_BAD_UTF8: Final = (
    b"\xff",
    b"\xfe",
    b"\xc0\x80",  # overlong NUL
    b"\xe0\x80\x80",  # overlong
    b"\xed\xa0\x80",  # an encoded surrogate
    b"\x80",  # a lone continuation byte
    b"\xc3",  # a sequence cut short
    b"\xe6\x9d",
    b"\xf4\x90\x80\x80",  # past U+10FFFF
    b"\xf8\x88\x80\x80\x80",
)
_NUMBERS: Final = (
    "0",
    "-0",
    "-1",
    "1.5",
    "1e3",
    "1E-400",
    "1e400",
    "-1e400",
    "9" * 40,
    "-" + "9" * 40,
    "18446744073709551616",
    "9223372036854775808",
    "9223372036854775807",
    "-9223372036854775809",
    "0.000000000000000000000000001",
    "1e308",
    "2.5e-324",
    "0x10",
    "01",
    "+1",
    ".5",
    "NaN",
    "Infinity",
)


@dataclass(frozen=True, slots=True)
class Frame:
    """One fuzzed frame: what to send and how it was made."""

    data: str | bytes
    kind: str

    @property
    def size(self) -> int:
        data = self.data
        return len(data) if isinstance(data, bytes) else len(data.encode("utf-8", "surrogatepass"))


class FrameFuzzer:
    """Seeded frames; ``kinds`` restricts which kinds are made (all by default)."""

    def __init__(
        self,
        seed: int,
        *,
        max_bytes: int = 4096,
        kinds: tuple[str, ...] = KINDS,
        ids: tuple[str, ...] = ("a", "b", "c", "d", "e", "f", "g", "h"),
        models: tuple[str, ...] = ("llama3.2:1b", "qwen2.5:0.5b", "no-such-model", "x" * 300),
    ) -> None:
        unknown = set(kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown frame kinds: {sorted(unknown)}")
        self.rng = random.Random(seed)
        self.max_bytes = max_bytes
        self.ids = ids
        self.models = models
        weights = dict(zip(KINDS, _WEIGHTS, strict=True))
        self._kinds = kinds
        self._weights = [weights[kind] for kind in kinds]
        self._makers: dict[str, Callable[[], str | bytes]] = {
            "valid": lambda: self._dumps(self.message()),
            "mutated": self._mutated,
            "near": self._near,
            "garbage": self._garbage,
            "deep": self._deep,
            "number": self._number,
            "oversize": self._oversize,
            "bad_utf8": self._bad_utf8,
            "surrogate": self._surrogate,
        }

    def __iter__(self) -> Iterator[Frame]:
        while True:
            yield self.frame()

    def frames(self, count: int) -> Iterator[Frame]:
        for _ in range(count):
            yield self.frame()

    def frame(self, kind: str | None = None) -> Frame:
        if kind is None:
            kind = self.rng.choices(self._kinds, self._weights)[0]
        return Frame(self._makers[kind](), kind)

    # -- valid messages ----------------------------------------------------------------------

    def message(self, kind: str | None = None) -> dict[str, Any]:
        """A valid client message as a dict."""
        rng = self.rng
        kind = kind or rng.choice(TYPES)
        match kind:
            case "hello":
                hello: dict[str, Any] = {"type": "hello", "protocol": 1}
                if rng.random() < 0.5:
                    hello["session"] = "s_" + self._word(1, 30)
                if rng.random() < 0.5:
                    hello["last_seq"] = rng.choice((0, 1, 5, 10**6))
                if rng.random() < 0.3:
                    hello["client"] = self._text(0, 40)
                return hello
            case "generate":
                generate: dict[str, Any] = {"type": "generate", "id": self._id()}
                if rng.random() < 0.6:
                    generate["model"] = rng.choice(self.models[:3])
                if rng.random() < 0.7:
                    generate["prompt"] = self._text(0, 60)
                else:
                    roles = ("system", "user", "assistant", "tool")
                    generate["messages"] = [
                        {"role": rng.choice(roles), "content": self._text(0, 30)}
                        for _ in range(rng.randint(1, 4))
                    ]
                if rng.random() < 0.3:
                    generate["system"] = self._text(0, 30)
                if rng.random() < 0.4:
                    generate["options"] = self._options()
                if rng.random() < 0.1:
                    generate["format"] = "json"
                if rng.random() < 0.2:
                    generate["history"] = rng.random() < 0.5
                return generate
            case "embed":
                embed: dict[str, Any] = {"type": "embed", "id": self._id(), "input": self._inputs()}
                if rng.random() < 0.3:
                    embed["normalize"] = rng.random() < 0.5
                if rng.random() < 0.3:
                    embed["encoding"] = rng.choice(("float", "base64"))
                return embed
            case "classify":
                labels = list(dict.fromkeys(self._word(1, 8) for _ in range(rng.randint(2, 5))))
                while len(labels) < 2:
                    labels.append(self._word(9, 12))
                classify: dict[str, Any] = {"type": "classify", "id": self._id()}
                classify |= {"input": self._inputs(), "labels": labels}
                if rng.random() < 0.3:
                    classify["multi_label"] = rng.random() < 0.5
                return classify
            case "cancel":
                return {"type": "cancel", "id": self._id()}
            case "ping":
                ping: dict[str, Any] = {"type": "ping"}
                if rng.random() < 0.7:
                    ping["nonce"] = rng.choice((self._text(0, 20), rng.randint(-(2**63), 2**63 - 1)))
                return ping
            case "ack":
                return {"type": "ack", "seq": rng.choice((0, 1, 2, 10, 1000, 2**40))}
            case _:
                raise ValueError(kind)

    def _options(self) -> dict[str, Any]:
        rng = self.rng
        choices: dict[str, Callable[[], Any]] = {
            "temperature": lambda: rng.choice((0.0, 0.7, 2.0)),
            "top_p": lambda: rng.choice((0.01, 0.9, 1.0)),
            "top_k": lambda: rng.choice((0, 40, 1000)),
            "max_tokens": lambda: rng.choice((1, 4, 16, 32768)),
            "stop": lambda: [self._text(1, 5) for _ in range(rng.randint(0, 3))],
            "seed": lambda: rng.randint(-(2**63), 2**63 - 1),
        }
        names = rng.sample(sorted(choices), rng.randint(1, len(choices)))
        return {name: choices[name]() for name in names}

    def _inputs(self) -> str | list[str]:
        if self.rng.random() < 0.5:
            return self._text(0, 40)
        return [self._text(0, 20) for _ in range(self.rng.randint(1, 4))]

    def _id(self) -> str:
        rng = self.rng
        roll = rng.random()
        if roll < 0.85:
            return rng.choice(self.ids)
        if roll < 0.95:
            return self._word(1, 64)
        return rng.choice(("é" * 64, "東" * 64, "😀", " ", "\u0000"))

    def _word(self, low: int, high: int) -> str:
        return "".join(
            self.rng.choices(string.ascii_letters + string.digits + "-_", k=self.rng.randint(low, high))
        )

    def _text(self, low: int, high: int) -> str:
        rng = self.rng
        if rng.random() < 0.2:
            return rng.choice(_ODD_TEXT)
        alphabet = string.printable + "éü東京😀—\u200b"
        return "".join(rng.choices(alphabet, k=rng.randint(low, high)))

    # -- JSON values of any shape ------------------------------------------------------------

    def value(self, depth: int = 0) -> Any:
        rng = self.rng
        roll = rng.randrange(10 if depth < 3 else 7)
        match roll:
            case 0:
                return None
            case 1:
                return rng.random() < 0.5
            case 2:
                return rng.randint(-(2**63), 2**64 - 1)
            case 3:
                return rng.choice((0.0, -1.5, 1e300, 3.14))
            case 4 | 5:
                return self._text(0, 20)
            case 6:
                return rng.choice(TYPES)
            case 7:
                return [self.value(depth + 1) for _ in range(rng.randint(0, 4))]
            case _:
                return {rng.choice(_FIELDS): self.value(depth + 1) for _ in range(rng.randint(0, 4))}

    # -- frame makers ------------------------------------------------------------------------

    def _dumps(self, value: Any) -> str:
        return orjson.dumps(value).decode()

    def _mutated(self) -> str:
        rng = self.rng
        message = self.message()
        for _ in range(rng.randint(1, 3)):
            keys = list(message)
            op = rng.randrange(7)
            if op == 0 and keys:
                del message[rng.choice(keys)]
            elif op == 1 and keys:
                message[rng.choice(keys)] = self.value()
            elif op == 2:
                message[rng.choice(_FIELDS)] = self.value()
            elif op == 3:
                message["type"] = rng.choice((self._word(0, 10), "Generate", "generate ", "", "hello"))
            elif op == 4:
                message["type"] = self.value()
            elif op == 5 and keys:
                key = rng.choice(keys)
                message[key] = [message[key]] if rng.random() < 0.5 else {"value": message[key]}
            elif op == 6:
                message = dict(rng.sample(list(message.items()), len(message)))  # a different key order
        if rng.random() < 0.05:
            return self._dumps([message])
        return self._dumps(message)

    def _near(self) -> str:
        rng = self.rng
        text = self._dumps(self.message())
        for _ in range(rng.randint(1, 3)):
            if not text:
                break
            at = rng.randrange(len(text))
            op = rng.randrange(6)
            if op == 0:
                text = text[:at]
            elif op == 1:
                text = text[:at] + text[at + 1 :]
            elif op == 2:
                text = text[:at] + rng.choice('{}[]",:\\ 0e-.tfn\u0000é') + text[at:]
            elif op == 3 and at + 1 < len(text):
                text = text[:at] + text[at + 1] + text[at] + text[at + 2 :]
            elif op == 4:
                end = min(len(text), at + rng.randint(1, 8))
                text = text[:end] + text[at:end] + text[end:]
            else:
                text = text + rng.choice(("}", "]", ",", " ", "\n", "{}", "x"))
        return text

    def _garbage(self) -> str | bytes:
        rng = self.rng
        op = rng.randrange(6)
        if op == 0:
            return bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64)))
        if op == 1:
            return "".join(rng.choices(string.printable, k=rng.randint(0, 64)))
        if op == 2:
            return rng.choice(("", " ", "\n", "\t\r\n ", "\u00a0"))
        if op == 3:
            return self._dumps(self.value())
        if op == 4:
            return rng.choice(("null", "true", "[]", "{}", '""', "0", '"hello"', "[{}]", '{"type"}'))
        return self._dumps([self.message() for _ in range(rng.randint(1, 3))])

    def _deep(self) -> str:
        rng = self.rng
        depth = rng.choice((64, 512, 1023, 1024, 1025, 2000, 5000))
        opener, closer = rng.choice((("[", "]"), ('{"a":', "}")))
        nested = opener * depth + "0" + closer * depth
        if rng.random() < 0.3:
            nested = nested[: rng.randrange(len(nested))]  # unclosed
        where = rng.randrange(3)
        if where == 0:
            return nested
        if where == 1:
            return '{"type":"generate","id":"d","prompt":"p","options":{"stop":' + nested + "}}"
        return '{"type":"ping","nonce":' + nested + "}"

    def _number(self) -> str:
        rng = self.rng
        number = rng.choice(_NUMBERS)
        templates = (
            '{"type":"ack","seq":%s}',
            '{"type":"hello","protocol":%s}',
            '{"type":"hello","protocol":1,"session":"s","last_seq":%s}',
            '{"type":"ping","nonce":%s}',
            '{"type":"generate","id":"n","prompt":"p","options":{"max_tokens":%s}}',
            '{"type":"generate","id":"n","prompt":"p","options":{"temperature":%s,"seed":%s}}',
            '{"type":"cancel","id":%s}',
            '{"type":%s}',
            "%s",
        )
        template = rng.choice(templates)
        return template.replace("%s", number)

    def _oversize(self) -> str | bytes:
        rng = self.rng
        limit = self.max_bytes
        target = limit + rng.choice((-1, 0, 1, 2, 3, 100, limit))
        head = '{"type":"generate","id":"big","prompt":"'
        tail = '"}'
        fill = max(0, target - len(head) - len(tail))
        # Multi-byte characters at the end, so the byte count and the character count differ.
        char = rng.choice(("a", "é", "東", "😀"))
        width = len(char.encode())
        body = "a" * (fill % width) + char * (fill // width)
        text = head + body + tail
        return text.encode() if rng.random() < 0.2 else text

    def _bad_utf8(self) -> bytes:
        rng = self.rng
        data = self._dumps(self.message()).encode()
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(data) + 1)
            data = data[:at] + rng.choice(_BAD_UTF8) + data[at:]
        return data

    def _surrogate(self) -> str:
        rng = self.rng
        lone = rng.choice(("\ud800", "\udfff", "\udc00\ud800", "\udbff"))
        message = self.message("ping")
        message["nonce"] = "x"
        text = self._dumps(message)
        at = text.index('"x"') + 1
        return text[:at] + lone + text[at:]
