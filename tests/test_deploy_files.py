"""The Dockerfile and compose file cannot be run here (no Docker engine): check them by parsing."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

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


def test_compose_environment_names_are_settings() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    fields = set(Settings.model_fields)
    sluice = compose["services"]["sluice"]
    assert sluice["build"] == "."
    for name in sluice["environment"]:
        assert name.startswith("SLUICE_")
        assert name.removeprefix("SLUICE_").lower() in fields, name
