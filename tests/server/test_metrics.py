"""Prometheus metrics and the /metrics route (server/metrics.py)."""

from __future__ import annotations

import httpx
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from server.metrics import Metrics, metrics_router


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body, _ = metrics.render()
    found: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_every_series_after_calls() -> None:
    m = Metrics()
    m.session_opened()
    m.session_opened()
    m.session_closed()
    m.connection_opened("ws")
    m.connection_opened("sse")
    m.connection_closed("sse")
    for kind, outcome in [("generate", "done"), ("generate", "cancelled"), ("embed", "timeout")]:
        m.request_started(kind)
        m.request_finished(kind, outcome)
    m.request_started("classify")
    for _ in range(5):
        m.tokens(2, "smollm2:135m")
    m.tokens(7, "llama3")
    m.ttft(0.02)
    m.queue_wait("embed", 0.003)
    m.batch_size("all-MiniLM-L6-v2", 16)
    m.batch_size("all-MiniLM-L6-v2", 3)
    m.outbound_merge()
    m.outbound_merge()
    m.outbound_close_slow()
    m.replay(12)

    s = samples(m)
    assert s[("sluice_sessions_open", ())] == 1
    assert s[("sluice_sessions_opened_total", ())] == 2
    assert s[("sluice_connections_open", (("transport", "ws"),))] == 1
    assert s[("sluice_connections_open", (("transport", "sse"),))] == 0
    assert s[("sluice_connections_total", (("transport", "sse"),))] == 1
    assert s[("sluice_requests_total", (("kind", "generate"), ("outcome", "done")))] == 1
    assert s[("sluice_requests_total", (("kind", "generate"), ("outcome", "cancelled")))] == 1
    assert s[("sluice_requests_total", (("kind", "embed"), ("outcome", "timeout")))] == 1
    assert s[("sluice_requests_inflight", (("kind", "generate"),))] == 0
    assert s[("sluice_requests_inflight", (("kind", "classify"),))] == 1
    assert s[("sluice_generated_tokens_total", (("model", "smollm2:135m"),))] == 10
    assert s[("sluice_generated_tokens_total", (("model", "llama3"),))] == 7
    assert s[("sluice_time_to_first_token_seconds_count", ())] == 1
    assert s[("sluice_time_to_first_token_seconds_bucket", (("le", "0.025"),))] == 1
    assert s[("sluice_time_to_first_token_seconds_bucket", (("le", "0.01"),))] == 0
    assert s[("sluice_queue_wait_seconds_sum", (("kind", "embed"),))] == 0.003
    assert s[("sluice_batch_size_count", (("model", "all-MiniLM-L6-v2"),))] == 2
    assert s[("sluice_batch_size_sum", (("model", "all-MiniLM-L6-v2"),))] == 19
    assert s[("sluice_outbound_merges_total", ())] == 2
    assert s[("sluice_outbound_slow_closes_total", ())] == 1
    assert s[("sluice_replays_total", ())] == 1
    assert s[("sluice_replayed_events_total", ())] == 12


def test_apps_do_not_share_series() -> None:
    one, two = Metrics(), Metrics()
    one.tokens(5, "m")
    one.session_opened()
    s = samples(two)
    assert ("sluice_generated_tokens_total", (("model", "m"),)) not in s
    assert s[("sluice_sessions_open", ())] == 0


def test_model_labels_are_capped() -> None:
    m = Metrics(max_models=2)
    for name in ["a", "b", "c", "d"]:
        m.tokens(1, name)
        m.batch_size(name, 1)
    s = samples(m)
    assert s[("sluice_generated_tokens_total", (("model", "other"),))] == 2
    assert s[("sluice_batch_size_count", (("model", "other"),))] == 2
    assert ("sluice_generated_tokens_total", (("model", "c"),)) not in s


async def test_metrics_route() -> None:
    m = Metrics()
    m.tokens(3, "m")
    app = FastAPI()
    app.include_router(metrics_router(m))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert 'sluice_generated_tokens_total{model="m"} 3.0' in response.text
    assert "/metrics" not in app.openapi()["paths"]
