"""The shape of the code base: no import cycle in `protocol/` or `server/`, no module past 600 lines,
and README's layout table naming what is really there.

The import graph is read from the source (AST), every ``import`` and ``from … import`` counted,
including the ones inside functions: a cycle broken only by a deferred import is still a cycle
for a reader. Imports under ``if TYPE_CHECKING:`` are left out: they never run.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("protocol", "server")
MAX_LINES = 600


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[module_name(path)] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            yield from (item for child in node.orelse for item in _imports(child))
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        yield from _imports(node)


def imported(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The modules of ``known`` that module ``name`` imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in _imports(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            candidates = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for candidate in candidates:
            # `import a.b.c` also runs a/__init__ and a/b/__init__.
            parts = candidate.split(".")
            for end in range(1, len(parts) + 1):
                prefix = ".".join(parts[:end])
                if prefix in known and prefix != name:
                    targets.add(prefix)
    return targets


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imported(name, path, known) for name, path in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_finds_cycles() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_package_init_imports_count_for_submodules(tmp_path: Path) -> None:
    known = {"pkg": tmp_path / "pkg" / "__init__.py", "pkg.sub": tmp_path / "pkg" / "sub.py", "top": tmp_path}
    source = tmp_path / "top.py"
    source.write_text("from pkg.sub import thing\nif TYPE_CHECKING:\n    import elsewhere\n")
    assert imported("top", source, known) == {"pkg", "pkg.sub"}


def test_no_import_cycle_in_protocol_or_server() -> None:
    graph = import_graph()
    assert "server.transports.sse" in graph and "protocol.session" in graph  # the walk saw the tree
    assert cycles(graph) == []


def test_protocol_imports_nothing_from_server() -> None:
    graph = import_graph()
    assert {
        name: sorted(t for t in targets if t.startswith("server"))
        for name, targets in graph.items()
        if name.startswith("protocol") and any(t.startswith("server") for t in targets)
    } == {}


def test_the_plain_http_apis_do_not_know_the_session_transports() -> None:
    graph = import_graph()
    leaks = {
        name: sorted(t for t in targets if t.startswith("server.transports"))
        for name, targets in graph.items()
        if name.startswith("server.api") and any(t.startswith("server.transports") for t in targets)
    }
    assert leaks == {}


@pytest.mark.parametrize("package", PACKAGES)
def test_no_module_is_over_600_lines(package: str) -> None:
    long = {
        str(path.relative_to(ROOT)): count
        for path in sorted((ROOT / package).rglob("*.py"))
        if (count := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


def test_readme_layout_table_names_real_paths() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    paths = re.findall(r"^\| `([^`]+)` \|", section, flags=re.MULTILINE)
    assert len(paths) >= 10
    missing = [path for path in paths if not (ROOT / path.rstrip("/")).exists()]
    assert missing == []
    # Every package of server/ has its row.
    for package in sorted(p for p in (ROOT / "server").iterdir() if (p / "__init__.py").exists()):
        assert f"server/{package.name}/" in paths, f"README layout lacks server/{package.name}/"
