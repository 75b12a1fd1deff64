"""Whether the configured Ollama servers answer and which models they list: upstream health, once.

`OllamaHealth` drives an `OllamaControl` (the backend's ``probe``, ``list_models`` and ``aclose``):
`refresh` probes every base URL (``/api/version``; the backend's probe also marks each URL healthy
or not for request routing, `server.backends.ollama.pool`) and, when one answers, re-reads the
model list (``/api/tags``); `refresh_soon` starts that in the background when the last look is
older than `REFRESH_S`, so a listing never waits on the network. `state`, `models` and `status`
are what the registry reports (``welcome.models``, ``/v1/models``, ``/ready``). Ollama being down
is a warning, not a failure: the state says ``unavailable`` and local models still serve.

`OLLAMA_PREFIX` is the one spelling of the ``ollama/`` model-name prefix (embed models served by
Ollama). This module must stay light (the registry imports it at start): no httpx, no I/O of its
own; every call to the network goes through the control it is given, and no failure of one
escapes (they are logged).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

from server.backends.base import BackendState

__all__ = ["OLLAMA_PREFIX", "REFRESH_S", "OllamaControl", "OllamaHealth"]

log = logging.getLogger(__name__)

# Model names that start with this are served by Ollama (``ollama/nomic-embed-text``).
OLLAMA_PREFIX = "ollama/"
# How old the model list and reachability may get before a listing refreshes them.
REFRESH_S = 10.0


@runtime_checkable
class OllamaControl(Protocol):
    """The part of ``server.backends.ollama.backend.OllamaBackend`` health needs besides `generate`."""

    async def probe(self) -> dict[str, bool]: ...
    async def list_models(self) -> list[str]: ...
    async def aclose(self) -> None: ...


class OllamaHealth:
    """Reachability per base URL and the last model list, for the URLs of one configuration."""

    def __init__(self, urls: Sequence[str], *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._control: OllamaControl | None = None
        self.state = BackendState.LOADING if urls else BackendState.UNAVAILABLE
        self._urls: dict[str, bool] = dict.fromkeys(urls, False)
        self._models: list[str] = []
        self._checked = 0.0
        self._refreshing: asyncio.Task[None] | None = None

    @property
    def configured(self) -> bool:
        return bool(self._urls)

    @property
    def models(self) -> list[str]:
        """The names the last ``/api/tags`` answer listed, each once, in its order."""
        return self._models

    def failed(self) -> None:
        """The backend could not be created: nothing will ever answer."""
        self.state = BackendState.FAILED

    async def attach(self, control: OllamaControl) -> None:
        """Start watching ``control``'s servers: a first refresh, now."""
        self._control = control
        await self.refresh(max_age_s=0.0)

    async def refresh(self, *, max_age_s: float = REFRESH_S) -> None:
        """Re-probe the URLs and re-read the model list if the last look is older than ``max_age_s``."""
        control = self._control
        if control is None or self._clock() - self._checked < max_age_s:
            return
        self._checked = self._clock()
        try:
            self._urls = dict(await control.probe())
        except Exception as exc:
            log.warning("probing Ollama failed: %r", exc)
            self._urls = dict.fromkeys(self._urls, False)
        if not any(self._urls.values()):
            if self.state != BackendState.UNAVAILABLE:
                log.warning("Ollama is unreachable at %s; local models still serve", ", ".join(self._urls))
            self.state = BackendState.UNAVAILABLE
            return
        try:
            self._models = list(dict.fromkeys(await control.list_models()))
        except Exception as exc:
            log.warning("listing Ollama models failed: %r", exc)
        self.state = BackendState.READY

    def refresh_soon(self) -> None:
        """`refresh` in the background when the last look is stale (and none is running)."""
        if self._control is None or self._clock() - self._checked < REFRESH_S:
            return
        if self._refreshing is not None and not self._refreshing.done():
            return
        try:
            self._refreshing = asyncio.get_running_loop().create_task(self.refresh())
        except RuntimeError:  # no running loop: the cached list will do
            pass

    def status(self) -> dict[str, object]:
        """What ``/ready`` shows of Ollama."""
        return {
            "configured": self.configured,
            "state": self.state,
            "urls": dict(self._urls),
            "models": len(self._models),
        }

    async def close(self) -> None:
        """Stop a background refresh; the control itself is closed by its owner."""
        self._control = None
        if self._refreshing is not None:
            self._refreshing.cancel()
            await asyncio.gather(self._refreshing, return_exceptions=True)
            self._refreshing = None
