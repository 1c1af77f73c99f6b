"""Imports run one way: cluster -> server -> pipeline -> draft_models -> compute
(loadtests, the benchmark, stands beside server: it may use pipeline and
below). Every import counts, at the top of a module or inside a function; an
arrow that runs back up, or a cycle between modules, fails."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cluster", "server", "loadtests", "pipeline", "draft_models", "compute")
# Which packages each package may import (besides itself).
ALLOWED = {
    "cluster": {"server", "loadtests", "pipeline", "draft_models", "compute"},
    "server": {"pipeline", "draft_models", "compute"},
    "loadtests": {"pipeline", "draft_models", "compute"},
    "pipeline": {"draft_models", "compute"},
    "draft_models": {"compute"},
    "compute": set(),
}


def module_imports() -> dict[str, set[str]]:
    """module name -> the project modules it imports."""
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            modules[name] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets.add(node.module)
                targets |= {f"{node.module}.{alias.name}" for alias in node.names}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def test_every_import_points_down():
    upward = [(name, target) for name, targets in module_imports().items() for target in targets
              if target.split(".")[0] != name.split(".")[0]
              and target.split(".")[0] not in ALLOWED[name.split(".")[0]]]
    assert not upward, "\n".join(f"{a} imports {b}" for a, b in sorted(upward))


def test_no_import_cycles():
    graph = module_imports()
    # A package's __init__ re-exporting its own modules is not a cycle of
    # concepts: only arrows between distinct modules count.
    edges = {name: {t for t in targets if t != name.rsplit(".", 1)[0]} for name, targets in graph.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)
