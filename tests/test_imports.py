"""No import circles in pha_lab. The graph is read from the source (ast), not by importing: every
`import pha_lab...` / `from pha_lab... import ...` (relative ones too) is an edge, at module level (what runs
on import, class bodies and try/except included, `if TYPE_CHECKING:` left out) or inside a function. A
circle among module-level imports breaks or half-initialises a module depending on who is imported first;
inside pha_lab/bench the function-level imports count too (the package is layered: timing at the bottom,
efficiency at the top)."""

from __future__ import annotations

import ast
import graphlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import pha_lab

ROOT = Path(pha_lab.__file__).parent


def module_files(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under `root` (a package's name is its __init__'s)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_in(tree: ast.Module) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement with whether it sits inside a function (else it runs on import: module level,
    class bodies, try/except); imports under `if TYPE_CHECKING:` are left out (they never run)."""

    def visit(node: ast.AST, in_function: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                children = child.orelse
            else:
                children = [child]
            for c in children:
                if isinstance(c, (ast.Import, ast.ImportFrom)):
                    yield c, in_function
                yield from visit(c, in_function or isinstance(c, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    yield from visit(tree, False)


def import_edges(name: str, path: Path, modules: set[str], package: str) -> tuple[set[str], set[str]]:
    """(modules imported at module level, modules imported inside functions) by module `name`. An import
    of a.b.c also runs the packages a and a.b unless they enclose the importer (then they already are)."""
    is_package = path.name == "__init__.py"
    top: set[str] = set()
    local: set[str] = set()
    for node, in_function in imports_in(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:  # relative: from the importer's package, `level - 1` packages up
                pkg = name.split(".") if is_package else name.split(".")[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        for target in names:
            if target != package and not target.startswith(package + "."):
                continue
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                mod = ".".join(parts[:i])
                if mod in modules and mod != name and not name.startswith(mod + "."):
                    (local if in_function else top).add(mod)
    return top, local


def import_graph(root: Path, package: str) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    files = module_files(root, package)
    top, local = {}, {}
    for name, path in files.items():
        top[name], local[name] = import_edges(name, path, set(files), package)
    return top, local


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as exc:
        return exc.args[1]
    return None


def test_the_walker_finds_a_circle_and_ignores_what_does_not_run_on_import(tmp_path):
    """The checks below can fail: a package with a module-level circle, a function-level one and a
    TYPE_CHECKING one is read as such."""
    pkg = tmp_path / "toy"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from toy.sub import c\n")
    (pkg / "a.py").write_text("from toy import b\nclass A:\n    import toy.sub.c\n")
    (pkg / "b.py").write_text("import json\ntry:\n    from .a import A\nexcept ImportError:\n    pass\n")
    (pkg / "sub" / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from toy import a\ndef f():\n    from ..b import x\n"
    )
    top, local = import_graph(pkg, "toy")
    assert top == {
        "toy": set(),
        "toy.a": {"toy.b", "toy.sub", "toy.sub.c"},
        "toy.b": {"toy.a"},
        "toy.sub": {"toy.sub.c"},
        "toy.sub.c": set(),
    }
    assert local["toy.sub.c"] == {"toy.b"} and not any(local[m] for m in top if m != "toy.sub.c")
    assert set(cycle(top)) == {"toy.a", "toy.b"}
    del top["toy.b"]
    assert cycle(top) is None


def test_pha_lab_has_no_module_level_import_circle():
    top, _ = import_graph(ROOT, "pha_lab")
    assert len(top) > 30 and "pha_lab.bench.timing" in top
    assert cycle(top) is None, f"import circle: {' -> '.join(cycle(top))}"


BENCH_LAYERS = [
    "timing",
    "spec",
    "gpt2_reference",
    "dss_variants",
    "workloads",
    "traffic",
    "roofline",
    "report",
    "overhead",
    "decode",
    "profile",
    "efficiency",
    "loss",
]  # the order of pha_lab/bench/__init__.py's docstring


def test_bench_imports_go_one_way():
    """Inside pha_lab/bench each module imports (at module level or in a function) only modules listed
    before it in BENCH_LAYERS: timing is the leaf (no pha_lab import at all), efficiency the top."""
    top, local = import_graph(ROOT, "pha_lab")
    bench = {
        m.removeprefix("pha_lab.bench."): {
            t.removeprefix("pha_lab.bench.") for t in top[m] | local[m] if t.startswith("pha_lab.bench.")
        }
        for m in top
        if m.startswith("pha_lab.bench.")
    }
    assert set(bench) == set(BENCH_LAYERS), "place every bench module in BENCH_LAYERS (and the package docstring)"
    upward = [
        f"{m} -> {t}" for m in BENCH_LAYERS for t in sorted(bench[m]) if BENCH_LAYERS.index(t) >= BENCH_LAYERS.index(m)
    ]
    assert upward == [], f"bench imports against the layering: {upward}"
    assert top["pha_lab.bench.timing"] == local["pha_lab.bench.timing"] == set()


def test_bench_keeps_lightning_out_of_its_import_path():
    """`import lightning` takes ~5 s on these cores: `pha-lab bench --plan` and every part but `overhead`
    must not load it, so no module that efficiency imports at module level (directly or not) imports it."""
    files = module_files(ROOT, "pha_lab")
    top, _ = import_graph(ROOT, "pha_lab")
    seen, todo = set(), ["pha_lab.bench.efficiency"]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += top[m]
    assert {"pha_lab.bench.timing", "pha_lab.bench.report", "pha_lab.models"} <= seen
    assert _imports_lightning_on_import(files["pha_lab.bench.overhead"])  # the check sees it where it is
    heavy = sorted(m for m in seen if _imports_lightning_on_import(files[m]))
    assert heavy == [], f"pha_lab.bench.efficiency pulls lightning in at import through {heavy}"


def _imports_lightning_on_import(path: Path) -> bool:
    for node, in_function in imports_in(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
        if not in_function and not getattr(node, "level", 0) and any(n.split(".")[0] == "lightning" for n in names):
            return True
    return False


def test_pha_lab_has_no_import_circle_even_through_functions():
    """With function-level imports counted too: a circle there is a design knot (data.corpora <-> data.mqar was
    one), even when it happens to import."""
    top, local = import_graph(ROOT, "pha_lab")
    both = {m: top[m] | local[m] for m in top}
    cli_free = {m: {t for t in ts if t != "pha_lab.cli"} for m, ts in both.items() if m != "pha_lab.cli"}
    assert cycle(cli_free) is None, f"import circle: {' -> '.join(cycle(cli_free))}"


@pytest.mark.parametrize(
    "module,heavy",
    [
        ("pha_lab.config", ["torch", "lightning", "pha_lab.data", "mlflow"]),
        ("pha_lab.sweep.spec", ["torch", "lightning", "optuna", "mlflow"]),
        ("pha_lab.analysis.runs", ["torch", "lightning", "mlflow"]),
        ("pha_lab.analysis.stats", ["torch", "lightning", "mlflow", "scipy"]),
        ("pha_lab.loading", ["torch", "lightning", "pha_lab.config"]),
        ("pha_lab.sweep.study", ["torch", "lightning", "optuna", "mlflow"]),
        ("pha_lab.data", ["torch", "lightning", "datasets"]),
    ],
)
def test_light_modules_import_nothing_heavy(module, heavy):
    """Start-up time: `pha-lab --help`, config checks and the analysis must not pay for torch/lightning/mlflow."""
    code = f"import sys, {module}; print(' '.join(m for m in {heavy!r} if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert loaded == [], f"importing {module} loads {loaded}"
