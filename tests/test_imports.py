"""The package's modules import one way: no import cycle and no import inside a function, and every module
imports on its own."""
import ast
import os
import pkgutil
import subprocess
import sys

import denseclip

from helpers import REPO

PACKAGE_DIR = os.path.dirname(denseclip.__file__)


def module_files():
    """{module name: source file} of every module of the package."""
    modules = {"denseclip": os.path.join(PACKAGE_DIR, "__init__.py")}
    for info in pkgutil.walk_packages([PACKAGE_DIR], prefix="denseclip."):
        path = os.path.join(PACKAGE_DIR, *info.name.split(".")[1:])
        modules[info.name] = os.path.join(path, "__init__.py") if info.ispkg else path + ".py"
    return modules


def resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute name a ``from ... import`` statement of ``module`` reads from."""
    if node.level == 0:
        return node.module or ""
    parts = module.split(".")
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def with_packages(module: str, target: str):
    """``target`` and the packages Python initialises before it (those that are not ``module``'s own)."""
    parts = target.split(".")
    own = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 2)}
    return [name for name in (".".join(parts[:i]) for i in range(1, len(parts) + 1)) if name not in own]


def package_imports(modules):
    """{module: [(imported package module, line, inside a function)]}: every import of a package module,
    ``from x import name`` counted as an import of x.name when that is a module, else of x; an import
    of a.b.c also counts as one of the packages a.b and a (their __init__ runs first)."""
    graph = {}
    for module, path in modules.items():
        with open(path) as f:
            tree = ast.parse(f.read())
        functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        nested = {id(n) for function in functions for n in ast.walk(function) if n is not function}
        edges = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                source = resolve(module, path.endswith("__init__.py"), node)
                targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]
            else:
                continue
            targets = [name for t in targets for name in with_packages(module, t)]
            edges += [(t, node.lineno, id(node) in nested) for t in targets if t in modules and t != module]
        graph[module] = edges
    return graph


def cycles(graph):
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target, _, _ in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle_and_no_import_inside_a_function():
    graph = package_imports(module_files())
    lazy = [f"{m}:{line} imports {t}" for m, edges in graph.items() for t, line, inside in edges if inside]
    assert not lazy, "imports inside functions: " + "; ".join(lazy)
    assert not cycles(graph), cycles(graph)


def test_an_import_counts_the_packages_python_initialises_first():
    assert with_packages("p.x.y", "p.a.b") == ["p.a", "p.a.b"]
    assert with_packages("p.a.y", "p.a.b") == ["p.a.b"]


def test_cycle_finder_finds_a_cycle_through_a_package():
    graph = {"p": [("p.a", 1, False)], "p.a": [("p.b", 1, False)], "p.b": [("p", 1, False)], "q": []}
    assert cycles(graph) == [["p", "p.a", "p.b"]]


def test_every_module_imports_on_its_own():
    """Each module, imported first in a fresh interpreter (the order a user's script may choose), with
    Detectron2 imported before it."""
    names = sorted(module_files())
    code = (
        "import importlib, sys\n"
        "import detectron2.engine, detectron2.modeling\n"
        "name = sys.argv[1]\n"
        "importlib.import_module(name)\n"
    )
    # One interpreter per top-level subpackage keeps this fast; each starts from its subpackage's first module.
    for name in names:
        if name.count(".") > 1:
            continue
        result = subprocess.run([sys.executable, "-c", code, name], capture_output=True, text=True, cwd=REPO, timeout=300)
        assert result.returncode == 0, f"import {name}:\n{result.stderr[-2000:]}"
