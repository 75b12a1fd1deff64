"""The client ships as one wheel that carries `protocol`, and its public API is pinned."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import sluice_client

ROOT = Path(__file__).resolve().parents[2]


def test_public_api_is_pinned() -> None:
    assert sorted(sluice_client.__all__) == [
        "AsyncClient",
        "AsyncGenerateStream",
        "AsyncSession",
        "Backoff",
        "Client",
        "ErrorCode",
        "GenerateStream",
        "GenerationResult",
        "Scores",
        "Session",
        "SluiceError",
        "ToolCall",
        "__version__",
        "connect",
        "stream_to_display",
    ]
    import protocol.errors

    # One error type on both sides of the wire.
    assert sluice_client.SluiceError is protocol.errors.SluiceError


def test_wheel_contains_the_client_and_the_protocol_package(tmp_path: Path) -> None:
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT / "clients" / "python"),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = tmp_path.glob("sluice_client-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(next(n for n in names if n.endswith("dist-info/METADATA"))).decode()
        archive.extractall(tmp_path / "unpacked")
    assert {
        "sluice_client/__init__.py",
        "sluice_client/transports/websocket.py",
        "sluice_client/py.typed",
    } <= names
    repo_protocol = {
        f"protocol/{p.relative_to(ROOT / 'protocol').as_posix()}" for p in (ROOT / "protocol").rglob("*.py")
    }
    assert repo_protocol <= names and "protocol/schema/messages.schema.json" in names
    assert not any("__pycache__" in name for name in names)
    for requirement in ("websockets", "httpx", "pydantic", "orjson", "numpy", "tqdm"):
        assert f"Requires-Dist: {requirement}" in metadata
    # Importable from the wheel alone: `protocol` comes from the wheel, not from the repo.
    unpacked = tmp_path / "unpacked"
    probe = (
        f"import sys; sys.path.insert(0, {str(unpacked)!r}); import protocol, sluice_client; "
        f"assert protocol.__file__.startswith({str(unpacked)!r}), protocol.__file__; "
        "assert sluice_client.__file__.startswith(sys.path[0]); print('ok')"
    )
    run = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert run.stdout.strip() == "ok", run.stderr[-2000:]
