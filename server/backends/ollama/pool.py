"""Which Ollama base URL a request goes to: the least busy healthy one.

`UpstreamPool` keeps, per base URL, the number of requests in flight and until when it is held
unhealthy (after a connect failure). `candidates` orders the URLs for one request: healthy ones,
least busy first, ties broken in turn so idle servers share sequential traffic; when none is
healthy, the one whose quarantine ends first gets a single try, so a one-server setup is never
refused without an attempt. The pool only does bookkeeping: it never opens connections.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["Upstream", "UpstreamPool"]


@dataclass(slots=True, eq=False)
class Upstream:
    url: str
    inflight: int = 0
    down_until: float = 0.0
    failures: int = 0

    def healthy(self, now: float) -> bool:
        return self.down_until <= now


class UpstreamPool:
    def __init__(
        self,
        urls: Sequence[str],
        *,
        retry_unhealthy_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.upstreams = [Upstream(url.rstrip("/")) for url in urls]
        self._retry_s = retry_unhealthy_s
        self._clock = clock
        self._turn = 0

    def candidates(self) -> list[Upstream]:
        """The URLs to try for one request, in order (empty only when none is configured)."""
        count = len(self.upstreams)
        if count <= 1:
            return list(self.upstreams)
        now = self._clock()
        healthy = [(index, up) for index, up in enumerate(self.upstreams) if up.healthy(now)]
        if not healthy:
            return [min(self.upstreams, key=lambda up: up.down_until)]
        self._turn = (self._turn + 1) % count
        turn = self._turn
        healthy.sort(key=lambda pair: (pair[1].inflight, (pair[0] - turn) % count))
        return [up for _, up in healthy]

    def connect_failed(self, upstream: Upstream) -> None:
        upstream.failures += 1
        upstream.down_until = self._clock() + self._retry_s

    def answered(self, upstream: Upstream) -> None:
        upstream.failures = 0
        upstream.down_until = 0.0

    def status(self) -> dict[str, dict[str, object]]:
        now = self._clock()
        return {
            up.url: {"healthy": up.healthy(now), "inflight": up.inflight, "failures": up.failures}
            for up in self.upstreams
        }
