"""examples/notebook.ipynb, executed headless (nbclient + ipykernel) against a real server."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient

from tests.client_python.test_real_server import upstream_text
from tests.support.ollama_emulator import Emulator

NOTEBOOK = Path(__file__).resolve().parents[2] / "examples" / "notebook.ipynb"


def _texts(cell: Any, output_type: str, mime: str = "text/plain") -> list[str]:
    found = []
    for output in cell.outputs:
        if output.output_type != output_type:
            continue
        if output_type == "stream":
            found.append(output.text)
        else:
            found.append(output.data.get(mime, ""))
    return found


def test_example_notebook_runs_and_shows_what_it_says(
    real_server: str, emu: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    emu.configure(token_rate=40)  # slow enough that the cell which breaks off really cancels
    monkeypatch.setenv("SLUICE_URL", real_server)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")
    NotebookClient(
        notebook, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    cells = {tag: cell for cell in notebook.cells for tag in cell.metadata.get("tags", [])}
    for tag, cell in cells.items():
        assert not [o for o in cell.outputs if o.output_type == "error"], (tag, cell.outputs)

    (html,) = _texts(cells["session"], "execute_result", "text/html")
    assert "sluice session" in html and "websocket" in html and "all-MiniLM-L6-v2" in html

    # One output area, updated in place to the whole reply.
    (shown,) = cells["display"].outputs
    assert shown.output_type == "display_data"
    assert shown.data["text/plain"] == upstream_text(emu, "Write one sentence about rivers.")
    (result,) = _texts(cells["result"], "execute_result")
    assert "finish_reason='stop'" in result

    printed = "".join(_texts(cells["chat"], "stream"))
    first, follow_up = upstream_text(emu, "Name a river."), upstream_text(emu, "How long is it?")
    assert printed == f"{first}\n{follow_up}\n"

    (cancelled,) = [r for r in emu.generations() if "Count slowly" in str(r.body)]
    assert emu.wait(lambda: cancelled.client_closed_early, timeout=5)
    (partial,) = _texts(cells["cancel"], "execute_result")
    # Three pieces (a piece may hold several tokens when the server merges them), then nothing.
    shown_before_break = ast.literal_eval(partial)
    full = upstream_text(emu, "Count slowly")
    assert shown_before_break and full.startswith(shown_before_break) and len(shown_before_break) < len(full)

    (shape,) = _texts(cells["embed"], "execute_result")
    assert shape == "((500, 384), dtype('float32'))"
    bar = "".join(_texts(cells["embed"], "stream"))
    assert "500/500" in bar and bar.count("\r") < 50  # redrawn as it moves, not on every tick
    (nearest,) = _texts(cells["search"], "execute_result")
    assert nearest.count("note ") == 3
    (scores,) = _texts(cells["classify"], "execute_result")
    assert "'urgent'" in scores and "'routine'" in scores
    (async_shown,) = _texts(cells["async"], "display_data")
    assert async_shown == upstream_text(emu, "Say hello.")
    (async_result,) = _texts(cells["async"], "execute_result")
    assert async_result == f"('stop', {len(async_shown.split())})"
