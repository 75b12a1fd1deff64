"""``sluice serve --workers N``: N > 1 needs cluster mode (SLUICE_REDIS_URL), else it refuses to
start and says what to set; with it, the workers check stays out of the way."""

from __future__ import annotations

import subprocess
import sys

import pytest

from server import cli


@pytest.fixture
def no_serving(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record what `main` would start instead of starting it (and leave logging alone)."""
    started: list[str] = []
    monkeypatch.setattr(cli, "configure_logging", lambda level: None)
    monkeypatch.setattr(cli, "serve", lambda settings: started.append("serve"))
    monkeypatch.setattr(cli, "_serve_workers", lambda settings: started.append(f"workers={settings.workers}"))
    monkeypatch.delenv("SLUICE_REDIS_URL", raising=False)
    monkeypatch.delenv("SLUICE_WORKERS", raising=False)
    return started


@pytest.mark.parametrize("how", ["flag", "env"])
def test_several_workers_without_redis_refuse_and_say_what_to_set(
    no_serving: list[str], monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    argv = ["serve", "--workers", "3"] if how == "flag" else ["serve"]
    if how == "env":
        monkeypatch.setenv("SLUICE_WORKERS", "3")
    with pytest.raises(SystemExit) as refused:
        cli.main(argv)
    message = str(refused.value.code)
    assert "--workers 3" in message and "SLUICE_REDIS_URL" in message and "redis://" in message
    assert no_serving == []


def test_one_worker_needs_no_redis(no_serving: list[str]) -> None:
    cli.main(["serve", "--workers", "1"])
    cli.main(["serve"])
    assert no_serving == ["serve", "serve"]


def test_several_workers_with_redis_pass_the_workers_check(
    no_serving: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLUICE_REDIS_URL", "redis://127.0.0.1:1/0")
    try:
        cli.main(["serve", "--workers", "2"])
    except SystemExit as exc:  # while cluster mode refuses to start, that refusal is the reason
        assert "--workers" not in str(exc.code)
    else:
        assert no_serving == ["workers=2"]


def test_the_real_command_refuses_before_binding_anything() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "server", "serve", "--workers", "2", "--port", "1"],
        env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "SLUICE_REDIS_URL" in result.stderr and "--workers 2" in result.stderr
