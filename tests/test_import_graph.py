"""supctl's modules depend downward: each imports alone, and no two import each other.

(a) Every module of the ``supctl`` package is imported alone, in one fresh interpreter
that forgets every supctl module between two imports: a module that only works when
something else was imported first fails here.
(b) The import graph of ``supctl/`` read with :mod:`ast` - every ``import`` and ``from``,
also under ``if TYPE_CHECKING:`` and inside functions, relative imports resolved - has
no cycle in ``supctl/tower``, and elsewhere none but the listed ones (:data:`KNOWN_CYCLES`).  A cycle under TYPE_CHECKING is still a cycle: the two modules cannot be
understood, tested or split apart one without the other.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "supctl"

IMPORT_EACH = """
import importlib, json, sys, traceback
failed = {}
for name in json.loads(sys.argv[1]):
    for loaded in [m for m in sys.modules if m == "supctl" or m.startswith("supctl.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except BaseException:
        failed[name] = traceback.format_exc(limit=-3)
print(json.dumps(failed))
"""


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The supctl modules ``name`` (at ``path``) imports, wherever the import statement is."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # ``from . import audit`` imports the module supctl.tower.audit.
            targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        for target in targets:
            # ``import supctl.tower.audit`` depends on the module itself, not on its packages.
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    edges = {name: imported(name, path, known) for name, path in found.items()}
    # A package's __init__ runs before any of its modules: an edge from a module up to its
    # own package is how Python works, not a design choice.  Only the other direction counts.
    for name, targets in edges.items():
        targets.difference_update(p for p in list(targets) if name.startswith(p + "."))
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``edges`` (its modules in order, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_each_module_imports_alone() -> None:
    names = sorted(modules())
    assert "supctl.tower.hub" in names and "supctl.tower.authorise" in names
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_EACH, json.dumps(names)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    failed = json.loads(result.stdout)
    assert failed == {}, "\n".join(f"{name}:\n{trace}" for name, trace in failed.items())


#: Cycles allowed in supctl: none (the last one, enforcer api <-> runtime, was broken by
#: moving ProcessSpec and Runtime into api).  The test fails when one appears.
KNOWN_CYCLES: list[set[str]] = []


def tangles(edges: dict[str, set[str]]) -> list[set[str]]:
    """The groups of modules that import one another (strongly connected, more than one)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(group)

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_the_towers_import_graph_has_no_cycle() -> None:
    edges = graph()
    tower = {name: targets for name, targets in edges.items() if name.startswith("supctl.tower")}
    cycle = find_cycle(tower)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_other_import_cycle_than_the_known_ones() -> None:
    edges = graph()
    found = tangles(edges)
    for group in found:
        if group not in KNOWN_CYCLES:
            cycle = find_cycle({name: edges[name] & group for name in group})
            raise AssertionError("import cycle: " + " -> ".join(cycle or sorted(group)))
    assert sorted(map(sorted, found)) == sorted(map(sorted, KNOWN_CYCLES)), "a known cycle is gone: drop it"


def test_the_cycle_finder_finds_cycles_under_type_checking(tmp_path: Path) -> None:
    """The check itself: the relative and TYPE_CHECKING imports it must see."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .c import C\n")
    (pkg / "c.py").write_text("def f():\n    from pkg.a import x\n")
    known = {"pkg", "pkg.a", "pkg.b", "pkg.c"}
    edges = {f"pkg.{m}": imported(f"pkg.{m}", pkg / f"{m}.py", known) for m in ("a", "b", "c")}
    assert edges == {"pkg.a": {"pkg", "pkg.b"}, "pkg.b": {"pkg.c"}, "pkg.c": {"pkg.a"}}
    edges = {name: targets - {"pkg"} for name, targets in edges.items()}
    assert find_cycle(edges) == ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]
