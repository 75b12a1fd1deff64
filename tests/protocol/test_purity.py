"""protocol/ is pure: no I/O, framework or model library is imported, directly or transitively."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "protocol"
# Never loaded, even indirectly, by importing protocol: the I/O, framework and model libraries.
FORBIDDEN = frozenset(
    {
        "asyncio",
        "fastapi",
        "starlette",
        "httpx",
        "torch",
        "uvicorn",
        "websockets",
        "sse_starlette",
        "anyio",
        "trio",
        "numpy",
        "transformers",
        "sentence_transformers",
        "redis",
        "server",
    }
)
# Never imported by protocol's own code. (pydantic itself loads some of these from the standard
# library, which is why they are only checked in the source.)
FORBIDDEN_IN_SOURCE = FORBIDDEN | {
    "socket",
    "ssl",
    "selectors",
    "threading",
    "concurrent",
    "multiprocessing",
    "subprocess",
    "<dynamic import>",
}

MODULES = sorted(p for p in PACKAGE.rglob("*.py"))


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__":
            roots.add("<dynamic import>")
        elif isinstance(node, ast.Attribute) and node.attr == "import_module":
            roots.add("<dynamic import>")
    return roots


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_no_forbidden_import_in_source(path: Path) -> None:
    bad = imported_roots(path) & FORBIDDEN_IN_SOURCE
    assert not bad, f"{path.name} imports {sorted(bad)}"


def test_scan_sees_every_module() -> None:
    assert {p.stem for p in MODULES} >= {
        "__init__",
        "codec",
        "errors",
        "eventlog",
        "lifecycle",
        "messages",
        "schema",
        "session",
        "sse",
    }


def test_importing_protocol_loads_nothing_forbidden() -> None:
    # A fresh interpreter, so that nothing another test imported hides a transitive import.
    code = (
        "import json, sys\n"
        "import protocol, protocol.codec, protocol.errors, protocol.eventlog, protocol.lifecycle\n"
        "import protocol.messages, protocol.schema, protocol.session, protocol.sse\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    loaded = {name.split(".")[0] for name in json.loads(result.stdout)}
    assert "protocol" in loaded
    assert not loaded & FORBIDDEN, sorted(loaded & FORBIDDEN)
