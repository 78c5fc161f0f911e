"""The package's shape: no private names across subpackages, no import cycles.

The layers themselves are checked by import-linter (``lint-imports``, contracts in
pyproject.toml), which ``make test`` runs before the tests.  These tests add what
import-linter does not check.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "apdask"


def _modules():
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path


def _imports(path, top_level_only=False):
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    for node in nodes:
        is_from = isinstance(node, ast.ImportFrom) and node.module and node.level == 0
        if is_from and (node.module == "apdask" or node.module.startswith("apdask.")):
            yield node


def _package(module, path):
    return module if path.name == "__init__.py" else module.rsplit(".", 1)[0]


def test_no_private_name_imported_across_packages():
    offenders = []
    for module, path in _modules():
        for node in _imports(path):
            source_pkg = node.module.rsplit(".", 1)[0]
            for alias in node.names:
                private = alias.name.startswith("_") and not alias.name.startswith("__")
                if private and source_pkg != _package(module, path):
                    offenders.append(f"{module}: from {node.module} import {alias.name}")
    assert offenders == []


def test_no_relative_imports():
    """Absolute imports only, so that the import graph a reader sees is the real one."""
    relative = []
    for module, path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                relative.append(f"{module}:{node.lineno}")
    assert relative == []


def test_no_import_cycles_between_modules():
    graph = {}
    names = {m for m, _ in _modules()}
    for module, path in _modules():
        deps = set()
        for node in _imports(path, top_level_only=True):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                deps.add(full if full in names else node.module)
        graph[module] = {d for d in deps if d in names and d != module}

    def is_pkg_init_edge(a, b):
        # a package's __init__ re-exports its submodules: that edge is not a cycle
        return a.startswith(b + ".") or b.startswith(a + ".")

    cycles = []
    state = {}

    def visit(node, stack):
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if is_pkg_init_edge(node, dep):
                continue
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep) :] + [dep])
            elif dep not in state:
                visit(dep, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert cycles == []


@pytest.mark.parametrize(
    "package",
    ["core", "_kernels", "io", "pipeline", "ppdb", "alerts", "services", "tools", "cli"],
)
def test_each_family_is_a_package_with_a_docstring(package):
    init = PKG / package / "__init__.py"
    assert init.is_file()
    assert ast.get_docstring(ast.parse(init.read_text()))


def _unannotated_public_functions(root):
    """``path:line name`` of each public function or method missing an annotation.

    Public: no leading underscore, at module level or a method of a public class.  Every
    positional-or-keyword and keyword-only argument (not ``self``/``cls``) and the return
    need an annotation.  Modules with a leading underscore count: their functions are
    imported by the public ones.
    """
    missing = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent)
        for node in ast.parse(path.read_text()).body:
            items = [node]
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                items = node.body
            for fn in items:
                if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                    continue
                if fn.name.startswith("_"):
                    continue
                args = [
                    a for a in fn.args.args + fn.args.kwonlyargs if a.arg not in ("self", "cls")
                ]
                if fn.returns is None or any(a.annotation is None for a in args):
                    missing.append(f"{rel}:{fn.lineno} {fn.name}")
    return missing


def test_public_functions_are_annotated():
    """Every public function and method has its argument and return annotations."""
    assert _unannotated_public_functions(PKG) == []


def test_the_annotation_check_finds_an_unannotated_function(tmp_path):
    """The check above can fail: it names unannotated public functions, and only those."""
    pkg = tmp_path / "apdask"
    pkg.mkdir()
    (pkg / "mod.py").write_text(
        "def ok(a: int, *, b: str = '') -> None: ...\n"
        "def no_return(a: int): ...\n"
        "def no_arg(a, b: int) -> int: ...\n"
        "def _private(a): ...\n"
        "class Public:\n"
        "    def __init__(self, a): ...\n"
        "    def method(self, *, k) -> None: ...\n"
        "    @classmethod\n"
        "    def make(cls) -> 'Public': ...\n"
        "class _Private:\n"
        "    def method(self, a): ...\n"
    )
    (pkg / "_private_module.py").write_text("def counted(a): ...\n")
    assert _unannotated_public_functions(pkg) == [
        "apdask/_private_module.py:1 counted",
        "apdask/mod.py:2 no_return",
        "apdask/mod.py:3 no_arg",
        "apdask/mod.py:7 method",
    ]
