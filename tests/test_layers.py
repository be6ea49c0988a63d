"""The packages are layers: a lower one never imports a higher one, and importing never goes round in a circle.

Layers, low to high (docs/architecture.md draws them): version, errors, runtime,
protocol, transports, rpc, deploy, endpoints, agent, plugin, user, cli, __main__, and the
package's own ``__init__``. Every import counts for the layering, also one
inside a function or under ``TYPE_CHECKING``. Circles are looked for among
the imports that run when a module is imported (the module's top level);
an annotation-only import under ``TYPE_CHECKING`` may point back, as two
classes that name each other in their signatures must.
"""

from __future__ import annotations

import ast
import os
from typing import Dict, List, Set, Tuple

import pytest

import remowt

LAYERS = [
    "remowt.version",
    "remowt.errors",
    "remowt.runtime",
    "remowt.protocol",
    "remowt.transports",
    "remowt.rpc",
    "remowt.deploy",
    "remowt.endpoints",
    "remowt.agent",
    "remowt.plugin",
    "remowt.user",
    "remowt.cli",
    "remowt.__main__",
    "remowt",
]
Edge = Tuple[str, str, int, bool]  # importer, imported, line, runs at import time


def modules(root: str, package: str) -> Dict[str, str]:
    """Every module under ``root`` (the directory of ``package``): dotted name -> file."""
    found = {}
    for directory, _, files in os.walk(root):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                dotted = os.path.relpath(path[:-3], os.path.dirname(root)).replace(os.sep, ".")
                found[dotted[: -len(".__init__")] if dotted.endswith(".__init__") else dotted] = path
    assert package in found
    return found


def imports(found: Dict[str, str]) -> List[Edge]:
    """Each import of one module of ``found`` by another."""
    edges: List[Edge] = []
    for module, path in found.items():
        with open(path) as f:
            tree = ast.parse(f.read())
        package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
        top_level = _top_level_imports(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join([*base, *([node.module] if node.module else [])]) if node.level else node.module
                names = [f"{target}.{alias.name}" for alias in node.names]
                targets = [name if name in found else target for name in names]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            for target in targets:
                if target in found and target != module:
                    edges.append((module, target, node.lineno, id(node) in top_level))
    return edges


def _top_level_imports(tree: ast.Module) -> Set[int]:
    """The imports that run when the module is imported: at its top level, not under ``if TYPE_CHECKING``."""
    ids: Set[int] = set()
    for statement in tree.body:
        if isinstance(statement, ast.If) and "TYPE_CHECKING" in ast.unparse(statement.test):
            continue
        for node in ast.walk(statement):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and not _inside_function(statement, node):
                ids.add(id(node))
    return ids


def _inside_function(statement: ast.stmt, node: ast.AST) -> bool:
    for function in ast.walk(statement):
        if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)) and any(n is node for n in ast.walk(function)):
            return True
    return False


def layer(module: str, layers: List[str]) -> int:
    """The index of the layer ``module`` belongs to (its longest listed prefix)."""
    best = max((p for p in layers if module == p or module.startswith(p + ".")), key=len)
    return layers.index(best)


def upward(edges: List[Edge], layers: List[str]) -> List[str]:
    return [
        f"{importer} (line {line}) imports {imported}, a higher layer"
        for importer, imported, line, _ in edges
        if layer(imported, layers) > layer(importer, layers)
    ]


def circles(edges: List[Edge]) -> List[List[str]]:
    """The circles among import-time imports (each as the modules on it)."""
    graph: Dict[str, Set[str]] = {}
    for importer, imported, _, at_import in edges:
        if at_import:
            graph.setdefault(importer, set()).add(imported)
    found: List[List[str]] = []
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    path: List[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for imported in sorted(graph.get(module, ())):
            if state.get(imported) == 1:
                found.append([*path[path.index(imported) :], imported])
            elif imported not in state:
                visit(imported)
        path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    return found


def remowt_edges() -> Tuple[Dict[str, str], List[Edge]]:
    found = modules(os.path.dirname(os.path.abspath(remowt.__file__)), "remowt")
    return found, imports(found)


@pytest.mark.timeout(30)
def test_every_module_is_in_a_layer() -> None:
    found, _ = remowt_edges()
    assert all(layer(module, LAYERS) >= 0 for module in found)
    assert {m.split(".")[1] for m in found if m.count(".") >= 1} <= {p.split(".")[1] for p in LAYERS[:-1]}


@pytest.mark.timeout(30)
def test_no_layer_imports_a_higher_one() -> None:
    _, edges = remowt_edges()
    assert upward(edges, LAYERS) == []


@pytest.mark.timeout(30)
def test_no_import_circles() -> None:
    _, edges = remowt_edges()
    assert circles(edges) == []


@pytest.mark.timeout(30)
def test_the_checks_catch_a_broken_tree(tmp_path: os.PathLike[str]) -> None:
    """A tree with an upward import and a circle is caught by both checks (so passing above means something)."""
    root = os.path.join(str(tmp_path), "pkg")
    for sub in ("low", "high"):
        os.makedirs(os.path.join(root, sub))
        open(os.path.join(root, sub, "__init__.py"), "w").close()
    open(os.path.join(root, "__init__.py"), "w").close()
    files = {
        "low/a.py": "from ..high import b\n",
        "high/b.py": "from . import c\n",
        "high/c.py": "from typing import TYPE_CHECKING\nfrom . import b\nif TYPE_CHECKING:\n    from . import d\n",
        "high/d.py": "from . import c\n",
    }
    for name, text in files.items():
        with open(os.path.join(root, name), "w") as f:
            f.write(text)
    edges = imports(modules(root, "pkg"))
    assert upward(edges, ["pkg.low", "pkg.high", "pkg"]) == ["pkg.low.a (line 1) imports pkg.high.b, a higher layer"]
    assert circles(edges) == [["pkg.high.b", "pkg.high.c", "pkg.high.b"]]
