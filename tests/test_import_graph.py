"""The project's import graph, read from the source with ``ast`` (nothing is imported).

Every import of a project module counts: module level and inside functions ("lazy"), but not
``if TYPE_CHECKING:`` blocks (annotations only, never run). Checks:
1. ``edge_client`` and ``server`` never import each other (both stand on ``common``);
2. no import circles between project modules;
3. no function-level import of a project module, except the allow-list below (one reason each);
4. ``server``'s rooms stack one way: store < federation < sweep < reports < the entry points.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "edge_client", "server")
# Lower rooms never import higher ones; modules directly in server/ (app, pipeline, CLIs) are the top.
SERVER_ROOMS = ("store", "federation", "sweep", "reports")
# (importing module, imported module): why it must stay inside a function.
LAZY_ALLOWED: dict[tuple[str, str], str] = {}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in modules:
            return ".".join(parts[:i])
    return None


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def import_edges() -> list[tuple[str, str, int, bool]]:
    """(importer, imported, line, lazy) for every import of a project module by a project module."""
    modules = _modules()
    edges: list[tuple[str, str, int, bool]] = []
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]

        def targets(node: ast.Import | ast.ImportFrom) -> list[str]:
            if isinstance(node, ast.Import):
                return [a.name for a in node.names]
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            return [base] + [f"{base}.{a.name}" for a in node.names]

        def walk(node: ast.AST, in_function: bool) -> None:
            for child in ast.iter_child_nodes(node):
                if _is_type_checking(child):
                    continue
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    seen = set()
                    for target in targets(child):
                        mod = _resolve(target, modules)
                        if mod and mod != name and mod not in seen:
                            seen.add(mod)
                            edges.append((name, mod, child.lineno, in_function))
                walk(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

        walk(ast.parse(path.read_text(), str(path)), False)
    return edges


def cycles(edges: list[tuple[str, str, int, bool]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    graph: dict[str, set[str]] = {}
    for a, b, _, _ in edges:
        graph.setdefault(a, set()).add(b)
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
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _room(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "server":
        return None
    if len(parts) > 2 and parts[1] in SERVER_ROOMS:
        return SERVER_ROOMS.index(parts[1])
    return len(SERVER_ROOMS)  # app, pipeline, the CLIs, server.distill


def test_graph_sees_imports():
    edges = import_edges()
    assert ("server.app", "common.scenario") in {(a, b) for a, b, _, _ in edges}
    assert len(_modules()) > 40


def test_edge_client_and_server_never_import_each_other():
    crossing = [(a, b, line) for a, b, line, _ in import_edges()
                if {a.split(".")[0], b.split(".")[0]} == {"edge_client", "server"}]
    assert crossing == []


def test_common_imports_neither_app():
    assert [(a, b) for a, b, _, _ in import_edges() if a.startswith("common") and not b.startswith("common")] == []


def test_no_import_circles():
    assert cycles(import_edges()) == []


def test_cycle_finder_finds_a_cycle():
    assert cycles([("a", "b", 1, False), ("b", "c", 1, True), ("c", "a", 1, False)]) == [["a", "b", "c"]]


def test_no_lazy_project_imports_beyond_the_allow_list():
    lazy = {(a, b) for a, b, _, is_lazy in import_edges() if is_lazy}
    assert sorted(lazy - set(LAZY_ALLOWED)) == []
    assert sorted(set(LAZY_ALLOWED) - lazy) == []  # a stale entry is removed with its import


def test_server_rooms_stack_one_way():
    upward = [(a, b) for a, b, _, _ in import_edges()
              if _room(a) is not None and _room(b) is not None and _room(b) > _room(a)]
    assert upward == []


def test_scenario_check_stays_torch_free():
    """``python -m server.check`` (scenario schema, resource estimate) answers without loading torch:
    the dataset descriptions it needs are common.dataset_meta, not common.datasets."""
    code = ("import sys; from server.check import main; rc = main(['--num-supernodes', '4']); "
            "sys.exit(10 + rc if 'torch' in sys.modules else rc)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
