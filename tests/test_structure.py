"""The package's import graph has no cycles, counting imports inside functions (which hide a cycle from
Python's import machinery but not from the reader), and no module imports another's private names."""

from __future__ import annotations

import ast
import importlib.metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("wsvd_passes", "lowering", "wsvd_kernels")


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _resolve(node: ast.ImportFrom, package: str) -> str:
    """The absolute module a ``from ... import`` reads, relative levels resolved against ``package``."""
    base = node.module or ""
    if node.level:
        parts = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join(parts + ([base] if base else []))
    return base


def _package(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its body (``from .x import y`` counts x, and y
    when y is a module)."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(node, _package(name, path))
                deps.add(base)
                deps.update(f"{base}.{alias.name}" for alias in node.names)
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_package_has_no_import_cycles():
    graph = import_graph()
    assert {"wsvd_passes.graph.capture", "lowering.match", "wsvd_kernels.reference"} <= set(graph)
    assert "wsvd_passes.artifacts.artifact" in graph["wsvd_passes.serve.export"]  # imported inside a function, two levels up
    assert cycles(graph) == []


def private_imports(modules: dict[str, Path]) -> list[str]:
    """``module: name`` for every private name (``_x``) one package module takes from another, by
    ``from m import _x`` or as ``m._x`` on a module it imported."""
    found = []
    for name, path in modules.items():
        tree, aliases = ast.parse(path.read_text()), set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = _resolve(node, _package(name, path))
                for alias in node.names:
                    if f"{base}.{alias.name}" in modules:
                        aliases.add(alias.asname or alias.name)
                    elif base in modules and base != name and alias.name.startswith("_") and not alias.name.startswith("__"):
                        found.append(f"{name}: {base}.{alias.name}")
            elif isinstance(node, ast.Import):
                aliases.update(a.asname for a in node.names if a.asname and a.name in modules)
        found += [f"{name}: {node.value.id}.{node.attr}" for node in ast.walk(tree)
                  if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                  and node.attr.startswith("_") and not node.attr.startswith("__")]
    return found


def test_no_module_imports_another_modules_private_names():
    assert private_imports(_modules()) == []


def test_the_private_import_finder_finds_them(tmp_path):
    pkg = tmp_path / "p"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("_x = 1\ny = 2\n")
    (pkg / "b.py").write_text("from .a import _x, y\nfrom . import a\nz = a._x + a.y\n")
    modules = {"p": pkg / "__init__.py", "p.a": pkg / "a.py", "p.b": pkg / "b.py"}
    assert private_imports(modules) == ["p.b: p.a._x", "p.b: a._x"]


@pytest.mark.parametrize("graph, expected", [({"a": {"b"}, "b": {"a"}, "c": {"a"}}, [["a", "b"]]),
                                             ({"a": {"b"}, "b": {"c"}, "c": set()}, [])])
def test_the_cycle_finder_finds_cycles(graph, expected):
    assert cycles(graph) == expected


def clashes(packages, owners: dict[str, list[str]]) -> dict[str, list[str]]:
    """Our top-level package -> the other distributions that ship a package of the same import name."""
    ours = {"wsvd-passes", "wsvd_passes"}
    return {p: sorted(set(owners[p]) - ours) for p in packages if set(owners.get(p, ())) - ours}


def test_no_other_installed_distribution_ships_a_top_level_package_of_ours():
    # transformers 5.25 requires Hugging Face's `kernels`; our kernel package, once named `kernels`, shadowed it
    # from the repository root (transformers failed to import) and was shadowed by it elsewhere
    assert clashes(PACKAGES, importlib.metadata.packages_distributions()) == {}
    assert clashes(("kernels", "lowering"), {"kernels": ["kernels", "wsvd-passes"]}) == {"kernels": ["kernels"]}


def test_module_paths_from_before_the_subpackages_import_the_moved_modules():
    import wsvd_passes.compress as old
    import wsvd_passes.compression.compress as new
    from wsvd_passes.compress import calibrate  # the README's Python API of earlier releases
    from wsvd_passes.models import load_model
    from wsvd_passes.moved import MOVED

    assert old is new and calibrate is new.calibrate
    assert load_model is importlib.import_module("wsvd_passes.models.registry").load_model
    assert all(importlib.import_module(f"wsvd_passes.{o}") is importlib.import_module(f"wsvd_passes.{n}")
               for o, n in MOVED.items())
    assert not [o for o in MOVED if f"wsvd_passes.{o}" in _modules()]  # no module of the package hides an old path


def test_imports_are_in_sorted_blocks():
    """Standard library, third party, this project, each block sorted (ruff's isort rules, pyproject.toml)."""
    import subprocess
    import sys

    pytest.importorskip("ruff", reason="ruff comes with the test extra: pip install -e '.[test]'")
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--select", "I", "--no-cache", "--quiet",
                             *PACKAGES, "tests", "examples"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, f"unsorted imports (fix: ruff check --select I --fix .):\n{result.stdout}"
