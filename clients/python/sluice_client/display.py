"""Notebook niceties: a reply that streams into one output area, progress bars, readable sessions.

In a Jupyter kernel, `LiveText` shows the reply in one display area and updates it in place
(IPython's display handle ``update``), at most every ``min_interval_s`` so a fast stream does not
flood the front end; anywhere else it writes the new text to stdout as it comes. `progress_bar`
picks tqdm's notebook widget only where ipywidgets is importable (tqdm's widget raises without it)
and plain tqdm elsewhere. `session_html` renders a session's summary. IPython is optional:
nothing here imports it unless running inside it, and nothing here talks to the server.
"""

from __future__ import annotations

import html
import importlib.util
import sys
import time
from collections.abc import Mapping
from typing import Any, Protocol

__all__ = ["LiveText", "ProgressBar", "in_notebook", "progress_bar", "session_html"]


def _kernel_shell() -> Any:
    if "IPython" not in sys.modules:
        return None
    from IPython import get_ipython

    shell = get_ipython()
    # A kernel (Jupyter, nbclient) can update an output area; a terminal IPython cannot.
    return shell if shell is not None and hasattr(shell, "kernel") else None


def in_notebook() -> bool:
    return _kernel_shell() is not None


class _Text:
    """Shown as the text itself (``text/plain``), not as a quoted string."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(self.text)


class LiveText:
    """One output area that follows a growing text (a `TextListener`)."""

    def __init__(self, min_interval_s: float = 0.05) -> None:
        self._min_interval_s = min_interval_s
        self._notebook = in_notebook()
        self._handle: Any = None
        self._shown_at = 0.0
        self._written = 0

    def update(self, text: str) -> None:
        if not self._notebook:
            self._write(text)
            return
        now = time.monotonic()
        if self._handle is not None and now - self._shown_at < self._min_interval_s:
            return
        self._show(text)
        self._shown_at = now

    def finish(self, text: str) -> None:
        if self._notebook:
            self._show(text)
        else:
            self._write(text)
            sys.stdout.write("\n")
            sys.stdout.flush()

    def _show(self, text: str) -> None:
        from IPython import display as ipython_display

        display: Any = ipython_display.display
        if self._handle is None:
            self._handle = display(_Text(text), display_id=True)
        else:
            self._handle.update(_Text(text))

    def _write(self, text: str) -> None:
        sys.stdout.write(text[self._written :])
        sys.stdout.flush()
        self._written = len(text)


class ProgressBar(Protocol):
    n: float

    def update(self, n: float = 1) -> bool | None: ...

    def close(self) -> None: ...


def progress_bar(total: int, description: str) -> ProgressBar:
    if in_notebook() and importlib.util.find_spec("ipywidgets") is not None:
        from tqdm.notebook import tqdm as notebook_tqdm  # type: ignore[import-untyped]

        bar: ProgressBar = notebook_tqdm(total=total, desc=description, unit="text")
        return bar
    from tqdm import tqdm  # type: ignore[import-untyped]

    plain: ProgressBar = tqdm(total=total, desc=description, unit="text", file=sys.stderr)
    return plain


def session_html(summary: Mapping[str, Any]) -> str:
    """An HTML table of a session summary (`AsyncSession.summary`)."""
    rows = []
    for key, value in summary.items():
        if isinstance(value, Mapping):
            value = "; ".join(f"{name}: {', '.join(map(str, items)) or '—'}" for name, items in value.items())
        elif isinstance(value, list | tuple):
            value = ", ".join(map(str, value)) or "—"
        rows.append(
            f"<tr><th style='text-align:left'>{html.escape(str(key))}</th><td>{html.escape(str(value))}</td></tr>"
        )
    return (
        "<table><caption style='text-align:left'><b>sluice session</b></caption>" + "".join(rows) + "</table>"
    )
