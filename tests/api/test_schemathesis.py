"""Property-based requests from ``/openapi.json`` (schemathesis): no input gets a 5xx.

Runs the schemathesis CLI against the shared test server, bounded in examples per operation,
per-request time and total time, on 127.0.0.1 only; the only check is ``not_a_server_error``.
Operations whose answer is an endless stream (a session's events) are left out: schemathesis
would wait on them until its request timeout.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.timeout(420)


def test_no_input_gets_a_server_error(base_url: str, tmp_path: Path) -> None:
    assert base_url.startswith("http://127.0.0.1:")
    schema = httpx.get(f"{base_url}/openapi.json", timeout=10.0)
    assert schema.status_code == 200
    paths = schema.json()["paths"]
    for expected in ("/v1/sessions", "/api/v1/generate", "/v1/chat/completions", "/api/chat", "/schema.json"):
        assert expected in paths
    executable = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert executable is not None, "schemathesis is not installed in this environment"
    command = [
        executable,
        "run",
        f"{base_url}/openapi.json",
        "--checks",
        "not_a_server_error",
        "--phases",
        "examples,coverage,fuzzing",
        "--max-examples",
        "12",
        "--workers",
        "1",
        "--request-timeout",
        "20",
        "--seed",
        "1",
        "--exclude-path-regex",
        r"/events$",
        "--suppress-health-check",
        "all",
        "--report",
        "junit",
        "--report-dir",
        str(tmp_path),
    ]
    run = subprocess.run(command, capture_output=True, text=True, timeout=380, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
