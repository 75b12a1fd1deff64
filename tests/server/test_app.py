"""The app in-process (fake models): health, readiness, drain, metrics, the WebSocket route, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.cli import _parser, main
from server.services import Services
from server.settings import Settings
from tests.server.fakes import FakeRegistry, ScriptedGenerator


class SlowRegistry(FakeRegistry):
    """Loaded only when the test says so."""

    loaded = False

    @property
    def ready(self) -> bool:
        return self.started and self.loaded


def services(client: TestClient) -> Services:
    found = client.app.state.sluice  # type: ignore[attr-defined]
    assert isinstance(found, Services)
    return found


def test_health_always_and_ready_only_once_loaded_and_not_draining() -> None:
    registry = SlowRegistry()
    with TestClient(create_app(Settings(), registry=registry)) as client:
        assert client.get("/health").json() == {"status": "ok"}
        loading = client.get("/ready")
        assert loading.status_code == 503 and loading.json()["ready"] is False
        registry.loaded = True
        ready = client.get("/ready")
        assert ready.status_code == 200
        assert ready.json() == {"fake": {"state": "ready"}, "ready": True, "draining": False}
        client.portal.call(services(client).drainer.drain)  # type: ignore[union-attr]
        draining = client.get("/ready")
        assert draining.status_code == 503 and draining.json()["draining"] is True
        assert client.get("/health").status_code == 200
    assert registry.closed


def test_websocket_route_speaks_the_protocol_and_metrics_count_it() -> None:
    registry = FakeRegistry(ScriptedGenerator(pieces=["x", "y"]))
    with TestClient(create_app(Settings(), registry=registry)) as client:
        with client.websocket_connect("/v1/ws", subprotocols=["sluice.v1"]) as ws:
            assert ws.accepted_subprotocol == "sluice.v1"
            ws.send_text('{"type":"generate","id":"g","prompt":"hi"}')
            welcome = ws.receive_json()
            assert welcome["type"] == "welcome" and welcome["models"]["generate"] == ["fake-gen"]
            assert welcome["limits"]["max_inflight"] == 64
            assert welcome["limits"]["max_buffered_bytes"] == Settings().outbound_hard_bytes
            received = [ws.receive_json() for _ in range(3)]
            assert [e["type"] for e in received] == ["delta", "delta", "done"]
        metrics = client.get("/metrics").text
        assert 'sluice_requests_total{kind="generate",outcome="done"} 1.0' in metrics
        assert 'sluice_connections_total{transport="websocket"} 1.0' in metrics
        assert "sluice_sessions_open 1.0" in metrics


def test_tickets_route_is_mounted() -> None:
    with TestClient(create_app(Settings(api_keys=["k1"]), registry=FakeRegistry())) as client:
        assert client.post("/v1/tickets").status_code == 401
        assert "ticket" in client.post("/v1/tickets", headers={"Authorization": "Bearer k1"}).json()


def test_schema_command_writes_the_contract_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["schema", "--out", str(tmp_path)])
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["asyncapi.json", "messages.schema.json"]
    assert json.loads((tmp_path / "asyncapi.json").read_text())["asyncapi"].startswith("3.")
    assert str(tmp_path) in capsys.readouterr().out


def test_serve_flags_parse_and_default_to_settings() -> None:
    args = _parser().parse_args(["serve", "--port", "9001", "--log-level", "debug"])
    assert args.port == 9001 and args.log_level == "debug" and args.host is None and args.workers is None
    with pytest.raises(SystemExit):
        _parser().parse_args(["serve", "--log-level", "loud"])


def test_fresh_server_with_ollama_down_serves_the_embedded_models() -> None:
    """What `make run` gives on a fresh machine: the default Ollama URL answers nothing, and the
    server still becomes ready and generates, embeds and classifies with its embedded models."""
    import httpx

    from tests.support.server import free_port, run_server

    dead = f"http://127.0.0.1:{free_port()}"
    with run_server({"SLUICE_OLLAMA_URLS": dead}) as base_url:
        ready = httpx.get(f"{base_url}/ready", timeout=10).json()
        assert ready["ollama"]["urls"] == {dead: False}
        reply = httpx.post(
            f"{base_url}/api/v1/generate",
            json={"prompt": "What is the capital of France?", "max_tokens": 12},
            timeout=120,
        )
        assert reply.status_code == 200, reply.text
        assert reply.json()["model"] == "smollm2:135m"
        assert reply.json()["text"].strip()
        vectors = httpx.post(f"{base_url}/api/v1/embeddings", json={"texts": ["a", "b"]}, timeout=60)
        assert vectors.json()["dimensions"] == 384
