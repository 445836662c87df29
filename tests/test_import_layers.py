"""Lower layers never import upper ones: the static import graph of spin_mcore (every ``import`` in a
module, at module level or inside functions, since a deferred import is still a dependency)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "spin_mcore"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """``{module: spin_mcore modules it imports}`` for every module of the package."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # ``from pkg import submodule`` depends on the submodule; ``from pkg import name`` on pkg
                subs = [f"{node.module}.{a.name}" for a in node.names]
                targets = [t for t in subs if t in modules]
                if len(targets) < len(subs):
                    targets.append(node.module)
            else:
                continue
            deps |= {t for t in targets if t in modules and t != name}
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of ``graph``: its strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in graph.get(todo.pop(), ()):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_slurm_parsing_is_a_leaf_that_distributed_uses():
    graph = import_graph()
    assert "spin_mcore.platform.slurm" in graph["spin_mcore.platform.distributed"]
    assert "spin_mcore.platform.distributed" not in reachable(graph, "spin_mcore.platform.slurm")
    assert "spin_mcore.platform.distributed" not in reachable(graph, "spin_mcore.platform.grid")


def test_the_package_has_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 100  # the walk found the package
    assert cycles(graph) == []
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # the finder finds one


def test_config_is_data_and_knows_no_models():
    graph = import_graph()
    below = reachable(graph, "spin_mcore.config")
    assert {"spin_mcore.errors", "spin_mcore.presets", "spin_mcore.hf_config"} <= below
    assert not any(m.startswith(("spin_mcore.models", "spin_mcore.training", "spin_mcore.platform")) for m in below)
    assert not any(m.startswith("spin_mcore.") for m in graph["spin_mcore.errors"])  # the bottom


def test_the_demo_uses_the_verifier_loops_never_the_reverse():
    graph = import_graph()
    loops = [m for m in graph if m.startswith("spin_mcore.selfimprove")]
    assert "spin_mcore.selfimprove.demo" in reachable(graph, "spin_mcore.demo.experiment")
    assert not any("spin_mcore.demo.experiment" in reachable(graph, m) for m in loops)
    # the arithmetic task (its checker is the arith verifiers') sits below both
    assert not any(d.startswith("spin_mcore.selfimprove") for d in reachable(graph, "spin_mcore.demo.task"))
