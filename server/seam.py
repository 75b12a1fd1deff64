"""The seam between the transports and the sessions: what both session registries provide.

The transports hold a `Sessions` (`server.sessions.SessionRegistry` in memory, or
`server.cluster.sessions.ClusterSessionRegistry` with ``SLUICE_REDIS_URL``) and the
`SessionHandle` it hands them; the drainer walks the registry's `Drainable` sessions. Written
as protocols so that neither registry knows the other; nothing here runs anything.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

from protocol.close import CloseCode
from protocol.errors import SluiceError
from protocol.messages import ClientMessage, Welcome
from protocol.session import Outcome
from server.outbox import Outbox
from server.sessions import NotAttached

__all__ = ["Connection", "Drainable", "SessionHandle", "Sessions"]


class SessionHandle(Protocol):
    """A session as a transport drives it."""

    @property
    def id(self) -> str: ...

    def handle(self, message: ClientMessage) -> Outcome:
        """Act on one client message without waiting (a WebSocket frame)."""
        ...

    async def handle_all(self, messages: Sequence[ClientMessage]) -> list[Outcome]:
        """Act on messages in order and say what became of each (``POST .../messages``)."""
        ...

    def refuse(self, error: SluiceError) -> None: ...

    def detach(self, outbox: Outbox) -> None: ...


class Drainable(Protocol):
    """A session as the drain sees it."""

    @property
    def busy(self) -> bool: ...

    @property
    def attached(self) -> bool: ...

    def goaway(self, reason: str, retry_after_ms: int) -> None: ...

    def fail_all(self, error: SluiceError) -> None: ...

    def finish_connection(self, code: CloseCode, reason: str) -> None: ...


class Connection(Protocol):
    """What `Sessions.connect` attached a WebSocket to."""

    @property
    def runtime(self) -> SessionHandle: ...

    @property
    def resumed(self) -> bool: ...


class Sessions(Protocol):
    """A session registry: see `server.sessions` for what each method promises."""

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Drainable]: ...

    async def connect(
        self,
        outbox: Outbox,
        *,
        key_id: str,
        welcome: Callable[[str, bool, int], Welcome],
        resume: str | None = None,
        last_seq: int | None = None,
    ) -> Connection: ...

    async def open_or_resume(
        self,
        *,
        key_id: str,
        welcome: Callable[[str, bool, int], Welcome],
        resume: str | None = None,
        last_seq: int | None = None,
    ) -> Welcome: ...

    async def attach(
        self, outbox: Outbox, *, session_id: str, key_id: str, last_seq: int
    ) -> SessionHandle | NotAttached: ...

    async def find(self, session_id: str, key_id: str) -> SessionHandle | None: ...

    async def end(self, session_id: str) -> bool: ...

    def start_sweeper(self) -> None: ...

    async def close(self) -> None: ...
