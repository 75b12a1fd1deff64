"""The seed-compatible ``/api/v1`` API on a real server, every endpoint."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator

import httpx
import numpy as np
import pytest

from tests.api.conftest import MODEL
from tests.api.sse_client import read_sse
from tests.support.ollama_emulator import Emulator

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def client(base_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=base_url, timeout=60.0) as http:
        yield http


async def test_generate(client: httpx.AsyncClient, emulator: Emulator) -> None:
    response = await client.post(
        "/api/v1/generate", json={"prompt": "seed generate", "model": MODEL, "max_tokens": 12}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["text"] == emulator.expected_text({"prompt": "seed generate", "options": {"num_predict": 12}})
    assert body["model"] == MODEL and body["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 12 and body["latency_ms"] > 0


async def test_generate_stream(client: httpx.AsyncClient, emulator: Emulator) -> None:
    body = {"prompt": "seed stream", "model": MODEL, "temperature": 0.5}
    async with client.stream("POST", "/api/v1/generate/stream", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        items = [item async for item in read_sse(response) if item.kind == "event"]
    assert items[-1].data == "[DONE]"
    text = "".join(item.json()["text"] for item in items[:-1])
    assert text == emulator.expected_text({"prompt": "seed stream"})


async def test_generate_stream_error_before_output_is_a_status(client: httpx.AsyncClient) -> None:
    response = await client.post("/api/v1/generate/stream", json={"prompt": "x", "model": "no-such-model"})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"


async def test_generate_stream_error_after_output_is_an_event(client: httpx.AsyncClient) -> None:
    body = {"prompt": "x", "model": "fault-error-midstream"}
    async with client.stream("POST", "/api/v1/generate/stream", json=body) as response:
        assert response.status_code == 200
        items = [item async for item in read_sse(response) if item.kind == "event"]
    assert [item.data for item in items][-1] == "[DONE]"
    error = items[-2].json()["error"]
    assert error["code"] == "upstream_error" and error["retryable"] is False
    assert all("text" in item.json() for item in items[:-2]) and len(items) > 2


async def test_embeddings(client: httpx.AsyncClient) -> None:
    response = await client.post("/api/v1/embeddings", json={"texts": ["a cat", "a kitten", "a tax form"]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "all-MiniLM-L6-v2" and body["dimensions"] == 384
    vectors = np.array(body["embeddings"])
    assert vectors.shape == (3, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]


async def test_classify(client: httpx.AsyncClient) -> None:
    body = {"text": "the stock market fell sharply today", "labels": ["sports", "finance", "cooking"]}
    response = await client.post("/api/v1/classify", json=body)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert results[0]["label"] == "finance"
    assert math.isclose(sum(r["score"] for r in results), 1.0, abs_tol=1e-4)
    assert [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)
    multi = await client.post("/api/v1/classify", json=body | {"multi_label": True})
    assert all(0.0 <= r["score"] <= 1.0 for r in multi.json()["results"])


async def test_batch_embeddings_polled_to_completion(client: httpx.AsyncClient) -> None:
    texts = [f"document number {n} about rivers" for n in range(300)]  # more than one dispatcher chunk
    started = await client.post("/api/v1/batch/embeddings", json={"texts": texts})
    assert started.status_code == 202, started.text
    job = started.json()
    assert job["status"] in ("pending", "running") and job["poll_url"] == f"/api/v1/tasks/{job['task_id']}"
    deadline = time.monotonic() + 60.0
    while True:
        polled = (await client.get(job["poll_url"])).json()
        if polled["status"] in ("completed", "failed") or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert polled["status"] == "completed", polled
    assert polled["progress"] == {"done": 300, "total": 300}
    result = polled["result"]
    assert result["model"] == "all-MiniLM-L6-v2" and result["dimensions"] == 384
    assert len(result["embeddings"]) == 300
    single = (await client.post("/api/v1/embeddings", json={"texts": [texts[299]]})).json()["embeddings"][0]
    assert np.allclose(result["embeddings"][299], single, atol=1e-5)


async def test_batch_job_that_fails_reports_its_typed_error(client: httpx.AsyncClient) -> None:
    started = await client.post(
        "/api/v1/batch/embeddings", json={"texts": ["x"], "model": "no-such-embedder"}
    )
    assert started.status_code == 202
    poll_url = started.json()["poll_url"]
    for _ in range(100):
        polled = (await client.get(poll_url)).json()
        if polled["status"] == "failed":
            break
        await asyncio.sleep(0.05)
    assert polled["status"] == "failed"
    assert polled["error"]["code"] == "model_not_found" and "result" not in polled
    missing = await client.get("/api/v1/tasks/task_unknown")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "invalid_request"


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/api/v1/generate", {"model": MODEL}, "prompt"),
        ("/api/v1/generate", {"model": MODEL, "prompt": ""}, "prompt"),
        ("/api/v1/generate/stream", {"model": MODEL, "prompt": ""}, "prompt"),
        ("/api/v1/generate", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ("/api/v1/embeddings", {"texts": []}, "texts"),
        ("/api/v1/embeddings", {"texts": ["ok", 3]}, "texts[1]"),
        ("/api/v1/classify", {"text": "x", "labels": ["only one"]}, "labels"),
        ("/api/v1/classify", {"text": "x", "labels": ["same", "same"]}, "labels"),
        ("/api/v1/batch/embeddings", {"texts": "not a list"}, "texts"),
    ],
)
async def test_bad_bodies_get_422_naming_the_field(
    client: httpx.AsyncClient, path: str, body: dict[str, object], field: str
) -> None:
    response = await client.post(path, json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request" and error["retryable"] is False
    assert error["field"] == field and f"'{field}'" in error["message"]


async def test_body_that_is_not_json_is_422(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/api/v1/generate", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 422 and response.json()["error"]["field"] == "body"


def _counter(metrics: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    for line in metrics.splitlines():
        head, _, value = line.rpartition(" ")
        if head.startswith(name + "{") and ",".join(sorted(head[len(name) + 1 : -1].split(","))) == wanted:
            return float(value)
    return 0.0


async def test_http_requests_share_the_metrics(client: httpx.AsyncClient) -> None:
    before = (await client.get("/metrics")).text
    await client.post("/api/v1/embeddings", json={"texts": ["counted"]})
    await client.post("/api/generate", json={"model": MODEL, "prompt": "counted", "stream": False})
    after = (await client.get("/metrics")).text
    for kind in ("embed", "generate"):
        labels = {"kind": kind, "outcome": "done"}
        assert (
            _counter(after, "sluice_requests_total", **labels)
            == _counter(before, "sluice_requests_total", **labels) + 1
        )
