"""The package's import graph has no circle, and the light modules stay light (start-up time)."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

import pha_lab

PACKAGE = Path(pha_lab.__file__).parent
# The bench package's circle (efficiency <-> gpt2_reference / overhead) goes with issue 12's bench split; then
# delete this set.
KNOWN_CIRCLE = {"pha_lab.bench.efficiency", "pha_lab.bench.gpt2_reference", "pha_lab.bench.overhead"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the pha_lab modules it imports anywhere in its body (function-local imports count)."""
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        graph[name] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in paths else base for a in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in paths and t != name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, found = {}, {}, [], []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                component.append(w)
            if component:
                found.append(sorted([v, *component]))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_circle():
    graph = import_graph()
    assert "pha_lab.data.mqar" in graph["pha_lab.config"] and "pha_lab.errors" in graph["pha_lab.data.mqar"]
    assert [c for c in circles(graph) if not set(c) <= KNOWN_CIRCLE] == []


def test_circle_finder_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("module,heavy", [
    ("pha_lab.config", ["torch", "lightning", "pha_lab.data", "mlflow"]),
    ("pha_lab.sweep.spec", ["torch", "lightning", "optuna", "mlflow"]),
    ("pha_lab.analysis.runs", ["torch", "lightning", "mlflow"]),
    ("pha_lab.data", ["torch", "lightning", "datasets"]),
])
def test_light_modules_import_nothing_heavy(module, heavy):
    code = f"import sys, {module}; print(' '.join(m for m in {heavy!r} if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert loaded == [], f"importing {module} loads {loaded}"
