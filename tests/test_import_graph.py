"""The import graph of ``collector/`` has no cycle (static: every ``import`` statement, read
with :mod:`ast`, including those under ``TYPE_CHECKING`` and inside functions).

``python -m tests.test_import_graph`` prints the graph (module: the collector modules it
imports) and the cycles, if any.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Collection, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "collector"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((ROOT / PACKAGE).rglob("*.py"))}


def _imported(node: ast.AST, here: str, is_package: bool, mods: Collection[str]) -> Iterator[str]:
    """What ``node`` imports: ``from pkg import module`` is an edge to the module (not to the
    package's ``__init__``), ``from module import name`` an edge to the module."""
    if isinstance(node, ast.Import):
        yield from (a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:  # relative: from the module's package
            pkg = here.split(".") if is_package else here.split(".")[:-1]
            pkg = pkg[: len(pkg) - (node.level - 1)]
            base = ".".join([*pkg, base] if base else pkg)
        subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in mods]
        yield from subs
        if len(subs) < len(node.names):
            yield base


def graph() -> dict[str, set[str]]:
    """Module -> the collector modules it imports."""
    mods = _modules()
    out: dict[str, set[str]] = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        deps = set()
        for node in ast.walk(tree):
            for target in _imported(node, name, path.name == "__init__.py", mods):
                if target in mods and target != name:
                    deps.add(target)
        out[name] = deps
    return out


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(g[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return found


def test_the_collector_has_no_import_cycle() -> None:
    assert cycles(graph()) == []


def test_the_graph_sees_a_cycle_when_there_is_one() -> None:
    g = graph()
    g["collector.service"] = {*g["collector.service"], "collector.alerting"}
    g["collector.alerting"] = {*g["collector.alerting"], "collector.service"}
    assert ["collector.alerting", "collector.service", "collector.wiring"] in cycles(g)


def test_no_test_module_imports_another() -> None:
    """Shared test code lives in ``tests/support`` (or conftest), never in a test module: a test
    module imported by another runs its import-time work twice and ties the two together."""
    offenders = []
    for path in sorted([*(ROOT / "tests").rglob("*.py"), *(ROOT / "bench").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            else:
                continue
            offenders += [
                f"{path.relative_to(ROOT)}: {n}"
                for n in names
                if n.split(".")[0] == "tests" and n.split(".")[1:2] and n.split(".")[1].startswith("test_")
            ]
    assert offenders == []


def test_no_part_is_handed_the_service() -> None:
    """Only the CLI imports collector.service (the parts get narrow dependencies)."""
    g = graph()
    assert sorted(m for m, deps in g.items() if "collector.service" in deps) == ["collector.cli"]


if __name__ == "__main__":
    g = graph()
    for m in sorted(g):
        print(f"{m}: {', '.join(sorted(g[m])) or '-'}")
    print(f"\n{len(g)} modules, {sum(len(d) for d in g.values())} imports; cycles: {cycles(g) or 'none'}")
