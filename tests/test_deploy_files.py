"""The Dockerfile and compose file cannot be run here (no Docker engine): check them by parsing."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from server.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def _dockerfile() -> list[str]:
    return (ROOT / "Dockerfile").read_text().splitlines()


def test_dockerfile_copies_only_what_exists() -> None:
    for line in _dockerfile():
        if line.startswith("COPY "):
            *sources, _dest = line.split()[1:]
            for source in sources:
                assert (ROOT / source).exists(), f"Dockerfile copies missing {source}"


def test_dockerfile_pins_torch_and_runs_the_console_script() -> None:
    text = "\n".join(_dockerfile())
    assert "-c constraints.txt" in text
    assert "torch==2.13.0" in (ROOT / "constraints.txt").read_text()
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    cmd = next(line for line in _dockerfile() if line.startswith("CMD "))
    assert re.search(r'"(\w+)"', cmd).group(1) in scripts  # type: ignore[union-attr]


def _compose() -> dict[str, Any]:
    compose: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return compose


def _nodes(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: spec for name, spec in compose["services"].items() if name.startswith("sluice")}


def test_compose_environment_names_are_settings() -> None:
    fields = set(Settings.model_fields)
    nodes = _nodes(_compose())
    assert nodes
    for sluice in nodes.values():
        assert sluice["build"] == "."
        for name in sluice["environment"]:
            assert name.startswith("SLUICE_")
            assert name.removeprefix("SLUICE_").lower() in fields, name


def test_compose_runs_two_identical_nodes_on_redis_and_ollama_behind_the_load_balancer() -> None:
    compose = _compose()
    services = compose["services"]
    assert set(services) == {"redis", "ollama", "sluice-1", "sluice-2", "lb"}
    nodes = _nodes(compose)
    assert len(nodes) == 2
    first, second = nodes.values()
    assert first == second  # identical nodes (one YAML anchor)
    env = first["environment"]
    redis_url = urlparse(env["SLUICE_REDIS_URL"])
    assert (redis_url.scheme, redis_url.hostname, redis_url.port) == ("redis", "redis", 6379)
    assert urlparse(env["SLUICE_OLLAMA_URLS"]).hostname == "ollama"
    assert set(first["depends_on"]) == {"redis", "ollama"}
    assert first["depends_on"]["redis"]["condition"] == "service_healthy"
    # Longer than the drain, so a stopping node finishes what it can before it is killed.
    grace = int(first["stop_grace_period"].removesuffix("s"))
    assert grace > Settings().drain_timeout_s
    # Only the load balancer is published; the nodes are reached through it.
    assert all("ports" not in spec for name, spec in services.items() if name != "lb")
    lb = services["lb"]
    assert lb["image"].startswith("nginx:")
    assert lb["ports"] == ["8000:8000"]
    assert set(lb["depends_on"]) == set(nodes)
    mount = next(volume for volume in lb["volumes"] if volume.endswith("/etc/nginx/nginx.conf:ro"))
    assert (ROOT / mount.split(":")[0]).resolve() == NGINX_CONF
    redis = services["redis"]
    assert redis["image"].startswith("redis:7")
    # Persistence off: Redis keeps everything or visibly loses everything, never a stale part.
    command = redis["command"]
    assert command[command.index("--save") + 1] == "" and command[command.index("--appendonly") + 1] == "no"
    assert "redis" in str(redis["healthcheck"]["test"])


# -- deploy/nginx.conf: a small parser of nginx's syntax (directives and blocks) ---------------

NGINX_CONF = (ROOT / "deploy" / "nginx.conf").resolve()
Block = list[tuple[str, list[str], "Block | None"]]


def _parse_nginx(text: str) -> Block:
    text = re.sub(r"#[^\n]*", "", text)
    tokens = re.findall(r'"[^"]*"|[{};]|[^\s{};]+', text)
    position = 0

    def block(nested: bool = False) -> Block:
        nonlocal position
        items: Block = []
        words: list[str] = []
        while position < len(tokens):
            token = tokens[position]
            position += 1
            if token == ";":
                items.append((words[0], words[1:], None))
                words = []
            elif token == "{":
                items.append((words[0], words[1:], block(nested=True)))
                words = []
            elif token == "}":
                assert nested and not words, f"unbalanced brace or unterminated directive {words}"
                return items
            else:
                words.append(token.strip('"'))
        assert not nested and not words, f"unclosed block or unterminated directive {words}"
        return items

    return block()


def _find(items: Block, name: str, *args: str) -> list[tuple[list[str], Block | None]]:
    return [(a, body) for n, a, body in items if n == name and a[: len(args)] == list(args)]


def _one(items: Block, name: str, *args: str) -> tuple[list[str], Block | None]:
    found = _find(items, name, *args)
    assert len(found) == 1, f"expected one {name} {args}, found {len(found)}"
    return found[0]


def _seconds(value: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    match = re.fullmatch(r"(\d+)(ms|s|m|h|d)?", value)
    assert match, value
    return int(match.group(1)) * units[match.group(2) or "s"]


def test_nginx_balances_round_robin_over_the_compose_nodes() -> None:
    http = _one(_parse_nginx(NGINX_CONF.read_text()), "http")[1]
    assert http is not None
    upstreams = _find(http, "upstream")
    assert len(upstreams) == 1
    (name,), upstream = upstreams[0]
    assert upstream is not None
    servers = [args[0] for args, _ in _find(upstream, "server")]
    port = Settings().port
    assert servers == [f"{node}:{port}" for node in _nodes(_compose())]
    # Round robin, no stickiness: no balancing method or session affinity of any kind.
    for directive in ("ip_hash", "hash", "sticky", "least_conn", "random", "least_time"):
        assert not _find(upstream, directive), directive
    # The one server block listens on what compose publishes and proxies everything there.
    (listen, *_), _ = _one(_one(http, "server")[1] or [], "listen")
    assert listen == compose_published_port()
    location = _one(_one(http, "server")[1] or [], "location", "/")[1]
    assert location is not None
    assert _one(location, "proxy_pass")[0] == [f"http://{name}"]


def compose_published_port() -> str:
    return str(_compose()["services"]["lb"]["ports"][0].split(":")[1])


def test_nginx_passes_websocket_upgrades_and_buffers_no_stream() -> None:
    config = _parse_nginx(NGINX_CONF.read_text())
    http = _one(config, "http")[1]
    assert http is not None
    location = _one(_one(http, "server")[1] or [], "location", "/")[1]
    assert location is not None
    assert _one(location, "proxy_http_version")[0] == ["1.1"]
    assert _one(location, "proxy_set_header", "Upgrade")[0] == ["Upgrade", "$http_upgrade"]
    (_, connection), _ = _one(location, "proxy_set_header", "Connection")
    # "upgrade" for handshakes, through the map on $http_upgrade (or literally).
    if connection.startswith("$"):
        (source, target), body = _one(http, "map")
        assert source == "$http_upgrade" and target == connection and body is not None
        assert _one(body, "default")[0] == ["upgrade"]
    else:
        assert connection.lower() == "upgrade"
    assert _one(location, "proxy_set_header", "Host")[0] == ["Host", "$http_host"]  # keeps the port
    for directive in ("proxy_buffering", "proxy_request_buffering", "proxy_cache"):
        assert _one(location, directive)[0] == ["off"], directive
    # Quiet but open streams outlive the server's keepalives by far.
    keepalive = max(Settings().ws_ping_interval_s, Settings().sse_keepalive_s)
    for directive in ("proxy_read_timeout", "proxy_send_timeout"):
        assert _seconds(_one(location, directive)[0][0]) >= 10 * keepalive, directive
    body_limit = _one(_one(http, "server")[1] or [], "client_max_body_size")[0][0]
    assert body_limit.lower() == f"{Settings().max_frame_bytes // 1_048_576}m"


def test_the_nginx_parser_refuses_what_nginx_would() -> None:
    with pytest.raises(AssertionError):
        _parse_nginx("http { server { listen 80; }")
    with pytest.raises(AssertionError):
        _parse_nginx("http { listen 80 }")
    with pytest.raises(AssertionError):
        _parse_nginx("http { } }")
    assert _parse_nginx('a 1; b "x y" { c; } # d;') == [("a", ["1"], None), ("b", ["x y"], [("c", [], None)])]
