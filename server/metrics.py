"""Prometheus metrics of one app, and the ``GET /metrics`` route that renders them.

Each `Metrics` owns its own ``CollectorRegistry``, so several apps in one process (tests) never
share or collide on series. The calls made per token or per outbound frame (`tokens`,
`outbound_merge`) only add to plain ints that a custom collector reads at scrape time; the rest
use labelled children bound once and cached, so no call looks labels up twice.

Label values come from closed sets (request kinds, transports, outcomes = ``done``,
``cancelled`` or an error code) or from resolved model names, which are capped at
``max_models`` distinct values (the rest count as ``other``) so that no client can grow the
series without bound. This module must never record anything identifying a caller (no key ids,
session ids or request ids as labels).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["Metrics", "metrics_router"]

_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_WAIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_OTHER = "other"
_M = TypeVar("_M", Counter, Gauge, Histogram)


class _HotCounters(Collector):
    """Counters kept as plain ints by the hot path and turned into metric families on scrape."""

    def __init__(self) -> None:
        self.tokens: dict[str, int] = {}
        self.outbound_merges = 0

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        return self._families()

    def _families(self) -> list[Metric]:
        tokens = CounterMetricFamily(
            "sluice_generated_tokens", "Tokens generated and sent to clients.", labels=["model"]
        )
        for model, count in list(self.tokens.items()):
            tokens.add_metric([model], count)
        merges = CounterMetricFamily(
            "sluice_outbound_merges",
            "Deltas merged into an earlier one because a connection's outbound buffer was full.",
        )
        merges.add_metric([], self.outbound_merges)
        return [tokens, merges]


class Metrics:
    """The metrics of one app. Every method is synchronous, cheap and never raises."""

    def __init__(self, *, max_models: int = 64) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._max_models = max_models
        self._hot = _HotCounters()
        self.registry.register(self._hot)
        r = self.registry
        self._sessions_open = Gauge("sluice_sessions_open", "Live sessions (attached or not).", registry=r)
        self._sessions_opened = Counter("sluice_sessions_opened", "Sessions created.", registry=r)
        self._connections_open = Gauge(
            "sluice_connections_open", "Open client connections.", ["transport"], registry=r
        )
        self._connections = Counter(
            "sluice_connections", "Client connections accepted.", ["transport"], registry=r
        )
        self._inflight = Gauge("sluice_requests_inflight", "Requests in flight.", ["kind"], registry=r)
        self._requests = Counter(
            "sluice_requests", "Requests finished, by kind and outcome.", ["kind", "outcome"], registry=r
        )
        self._ttft = Histogram(
            "sluice_time_to_first_token_seconds",
            "From a generate request's arrival to its first token.",
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self._queue_wait = Histogram(
            "sluice_queue_wait_seconds",
            "Time a request waited before its work started.",
            ["kind"],
            buckets=_WAIT_BUCKETS,
            registry=r,
        )
        self._batch_size = Histogram(
            "sluice_batch_size",
            "Items per batched forward pass.",
            ["model"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self._slow_closes = Counter(
            "sluice_outbound_slow_closes",
            "Connections closed 4008 because the client did not read.",
            registry=r,
        )
        self._replays = Counter("sluice_replays", "Resumes that replayed a session's log.", registry=r)
        self._replayed_events = Counter("sluice_replayed_events", "Events sent again by replays.", registry=r)
        # Children bound once per label value: labels() takes a lock and builds a tuple each call.
        self._connections_open_by: dict[str, Gauge] = {}
        self._connections_by: dict[str, Counter] = {}
        self._inflight_by: dict[str, Gauge] = {}
        self._requests_by: dict[tuple[str, str], Counter] = {}
        self._queue_wait_by: dict[str, Histogram] = {}
        self._batch_size_by: dict[str, Histogram] = {}
        self._models: set[str] = set()

    # Sessions and connections.

    def session_opened(self) -> None:
        self._sessions_open.inc()
        self._sessions_opened.inc()

    def session_closed(self) -> None:
        self._sessions_open.dec()

    def connection_opened(self, transport: str) -> None:
        self._child(self._connections_open_by, self._connections_open, transport).inc()
        self._child(self._connections_by, self._connections, transport).inc()

    def connection_closed(self, transport: str) -> None:
        self._child(self._connections_open_by, self._connections_open, transport).dec()

    # Requests.

    def request_started(self, kind: str) -> None:
        self._child(self._inflight_by, self._inflight, kind).inc()

    def request_finished(self, kind: str, outcome: str) -> None:
        """``outcome``: ``done``, ``cancelled`` or the error code that ended the request."""
        self._child(self._inflight_by, self._inflight, kind).dec()
        child = self._requests_by.get((kind, outcome))
        if child is None:
            child = self._requests_by[(kind, outcome)] = self._requests.labels(kind, outcome)
        child.inc()

    def tokens(self, n: int, model: str) -> None:
        counts = self._hot.tokens
        if model not in counts:
            model = self._model_label(model)
        counts[model] = counts.get(model, 0) + n

    def ttft(self, seconds: float) -> None:
        self._ttft.observe(seconds)

    def queue_wait(self, kind: str, seconds: float) -> None:
        self._child(self._queue_wait_by, self._queue_wait, kind).observe(seconds)

    def batch_size(self, model: str, n: int) -> None:
        child = self._batch_size_by.get(model)
        if child is None:
            label = self._model_label(model)
            child = self._batch_size_by[model] = self._batch_size.labels(label)
        child.observe(n)

    # Outbound buffers and resume.

    def outbound_merge(self) -> None:
        self._hot.outbound_merges += 1

    def outbound_close_slow(self) -> None:
        self._slow_closes.inc()

    def replay(self, events: int) -> None:
        self._replays.inc()
        self._replayed_events.inc(events)

    # Exposition.

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition of every series, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def _model_label(self, model: str) -> str:
        if model in self._models:
            return model
        if len(self._models) >= self._max_models:
            return _OTHER
        self._models.add(model)
        return model

    @staticmethod
    def _child(cache: dict[str, _M], parent: _M, label: str) -> _M:
        child = cache.get(label)
        if child is None:
            child = cache[label] = parent.labels(label)
        return child


def metrics_router(metrics: Metrics) -> APIRouter:
    """A router serving ``GET /metrics`` from ``metrics`` (left out of the OpenAPI schema)."""
    router = APIRouter()

    @router.get("/metrics", include_in_schema=False)
    async def scrape() -> Response:
        body, content_type = metrics.render()
        return Response(content=body, media_type=content_type)

    return router
