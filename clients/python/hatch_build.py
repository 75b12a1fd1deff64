"""Build hook: put the repo's `protocol` package into the (non-editable) wheel.

The client reuses the wire models of `protocol/` instead of copying them, and `pip install
clients/python` must work on its own, so the wheel carries it. An editable install must not: the
copy would land in site-packages and shadow the repo's own editable `protocol` in a shared venv.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


class ProtocolPackageHook(BuildHookInterface):  # type: ignore[type-arg]
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel" or version == "editable":
            return
        source = (Path(self.root) / ".." / ".." / "protocol").resolve()
        if not (source / "messages.py").is_file():
            raise FileNotFoundError(f"the sluice protocol package is not at {source}")
        build_data["force_include"][str(source)] = "protocol"
