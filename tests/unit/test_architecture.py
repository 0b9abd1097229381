"""The layout's rules, checked on the source: no import cycles, and Ray only in the job modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
PACKAGES = ("pipeline", "xclip_core")
# the only modules that import ray: the job modules, and the Jobs API client (ray.job_submission)
RAY_MODULES = {"pipeline.embed.on_ray", "pipeline.train.on_ray", "pipeline.cluster.submit"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def imports(name: str, path: Path) -> set[str]:
    """Every module ``path`` imports, anywhere in it (inside functions and TYPE_CHECKING blocks too):
    ``from a.b import c`` counts as ``a.b.c`` where that is a module, else as ``a.b``. A package's lazy
    exports (``_EXPORTS = {"Name": ".module"}``, imported on first use) count as imports of their modules."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "_EXPORTS" for t in node.targets):
            modules = [value.value for value in getattr(node.value, "values", [])]
            found.update(package + m if m.startswith(".") else m for m in modules)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    edges = {}
    for name, path in known.items():
        targets = set()
        for target in imports(name, path):
            # the longest known module that the import names (a.b.c may be a module or a name in a.b)
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                targets.add(target)
        edges[name] = targets
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in edges[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in edges:
        if node not in index:
            visit(node)
    return found


def test_the_checker_finds_a_cycle_and_the_import_forms() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    edges = graph()
    assert "pipeline.library" in edges["pipeline.search.searcher"]  # from ..library import Library
    assert "pipeline.library.index" in edges["pipeline.search.searcher"]  # from ..library import index
    assert "pipeline.library.reader" in edges["pipeline.library"]  # "Library": ".reader" (a lazy export)
    assert "pipeline.search" in edges["pipeline"]  # "Searcher": "pipeline.search"
    assert "pipeline.storage" in edges["pipeline.library.reader"]


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycles(package: str) -> None:
    inside = {name: targets for name, targets in graph().items() if name.split(".")[0] == package}
    edges = {name: targets & inside.keys() for name, targets in inside.items()}
    assert cycles(edges) == []


def test_only_the_job_modules_import_ray() -> None:
    importers = {
        name
        for name, path in modules().items()
        if any(target == "ray" or target.startswith("ray.") for target in imports(name, path))
    }
    assert importers == RAY_MODULES


def test_the_pipeline_reaches_models_through_the_interface() -> None:
    """Only the loader names a model class; the pipeline never imports ``XCLIPModel``."""
    users = {
        name
        for name, path in modules().items()
        if name.startswith("pipeline.") and any(t.endswith("XCLIPModel") for t in imports(name, path))
    }
    assert users == set()
