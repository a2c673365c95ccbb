"""The project's import structure: no import cycles, no private names taken from another module, and every module
importable on its own in a fresh interpreter, in any order.

The first two checks read the source with ``ast`` (imports inside functions included) over the project's modules:
``engine/``, ``kernels/``, ``models/`` and ``train.py``. Module names follow the files: ``engine/loader/__init__.py``
is ``engine.loader``, ``engine/loader/dali.py`` is ``engine.loader.dali``.

Edges of the import graph:

- ``import a.b.c`` and ``from a.b import c`` point at the deepest project module named (``a.b.c`` when ``c`` is a
  module, else ``a.b``); relative imports are resolved against the importing module's package;
  ``importlib.import_module("a.b")`` with a literal name counts as ``import a.b``.
- Importing ``a.b.c`` also runs the ``__init__`` of the packages ``a`` and ``a.b``: those implicit edges count too,
  except towards the importing module's own ancestor packages (a package is in ``sys.modules``, partly initialized,
  before its submodules run, so reaching a sibling through it needs nothing it defines).
- An explicit import of the module's own ancestor package (``from engine.loader import Loader`` inside
  ``engine/loader/dali.py``) counts, unless that ``__init__`` only re-exports (its body is imports, ``__all__`` and a
  docstring): then the names it hands out are the siblings' own, and the edge is not a cycle by itself.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "kernels", "models")
SCRIPTS = ("train.py", "train_fused.py")


# ---- the project's modules -----------------------------------------------------------------------------------------

def project_modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the project under ``root``."""
    files = [root / s for s in SCRIPTS if (root / s).exists()]
    for pkg in PACKAGES:
        files += sorted(p for p in (root / pkg).rglob("*.py") if "__pycache__" not in p.parts)
    names = {}
    for path in files:
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


@dataclass(frozen=True)
class ImportRef:
    """One imported project module, as a source line names it.

    Attributes
    ----------
    module : str
        The deepest project module the statement names.
    line : int
        Line of the statement.
    names : tuple of str
        For ``from module import ...``: the imported names that are not themselves modules.
    """

    module: str
    line: int
    names: tuple[str, ...] = ()


class Project:
    """The import structure of a set of modules (``project_modules``), read statically."""

    def __init__(self, modules: dict[str, Path]) -> None:
        self.modules = modules
        self.trees = {name: ast.parse(path.read_text(), str(path)) for name, path in modules.items()}

    def is_package(self, name: str) -> bool:
        return self.modules[name].name == "__init__.py"

    @staticmethod
    def ancestors(name: str) -> list[str]:
        parts = name.split(".")
        return [".".join(parts[:i]) for i in range(1, len(parts))]

    def only_reexports(self, name: str) -> bool:
        """True for a package ``__init__`` whose body is only imports, ``__all__`` and a docstring."""
        for i, node in enumerate(self.trees[name].body):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            if i == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
                continue  # the docstring
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else []
            if targets and all(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
                continue
            return False
        return True

    def resolve(self, importer: str, node: ast.ImportFrom) -> str:
        """The absolute module name of a ``from ... import`` statement in module ``importer``."""
        if not node.level:
            return node.module or ""
        package = importer if self.is_package(importer) else importer.rpartition(".")[0]
        base = package.split(".")
        if node.level > 1:
            base = base[:len(base) - (node.level - 1)]
        return ".".join(base + ([node.module] if node.module else []))

    def deepest(self, dotted: str) -> str | None:
        """The longest prefix of ``dotted`` that is a project module, else None."""
        parts = dotted.split(".")
        for i in range(len(parts), 0, -1):
            if ".".join(parts[:i]) in self.modules:
                return ".".join(parts[:i])
        return None

    def imports_of(self, name: str) -> list[ImportRef]:
        """Every project module that module ``name`` imports, anywhere in its source (functions included)."""
        refs: list[ImportRef] = []
        for node in ast.walk(self.trees[name]):
            if isinstance(node, ast.Import):
                refs += [ImportRef(t, node.lineno) for t in map(self.deepest, (a.name for a in node.names)) if t]
            elif isinstance(node, ast.ImportFrom):
                base = self.resolve(name, node)
                target = self.deepest(base)
                if target is None:
                    continue
                plain = []
                for alias in node.names:
                    if target == base and f"{base}.{alias.name}" in self.modules:
                        refs.append(ImportRef(f"{base}.{alias.name}", node.lineno))
                        refs.append(ImportRef(target, node.lineno))  # ``from a import b`` runs a's __init__ first
                    else:
                        plain.append(alias.name)
                if plain:
                    refs.append(ImportRef(target, node.lineno, tuple(plain)))
            elif isinstance(node, ast.Call) and _literal_import_module(node):
                target = self.deepest(node.args[0].value)
                if target:
                    refs.append(ImportRef(target, node.lineno))
        return refs

    def graph(self) -> dict[str, dict[str, int]]:
        """module -> {imported project module: line of the first import}, with the edge rules of the module
        docstring."""
        graph: dict[str, dict[str, int]] = {m: {} for m in self.modules}
        for name in self.modules:
            own = set(self.ancestors(name))
            for ref in self.imports_of(name):
                targets = [a for a in self.ancestors(ref.module) if a in self.modules and a not in own]
                if not (ref.module in own and self.only_reexports(ref.module)):
                    targets.append(ref.module)
                for t in targets:
                    if t != name:
                        graph[name].setdefault(t, ref.line)
        return graph

    def private_imports(self) -> list[str]:
        """Private names one module takes from another: ``from x import _y``, and ``x._y`` on a module alias."""
        found = []
        for name, tree in sorted(self.trees.items()):
            aliases: dict[str, str] = {}  # local name -> the project module it is bound to
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    for alias in node.names:
                        bound = alias.name if alias.asname else alias.name.split(".")[0]
                        if bound in self.modules:
                            aliases[alias.asname or bound] = bound
                elif isinstance(node, ast.ImportFrom):
                    base = self.resolve(name, node)
                    for alias in node.names:
                        if f"{base}.{alias.name}" in self.modules:
                            aliases[alias.asname or alias.name] = f"{base}.{alias.name}"
                        elif self.deepest(base) and _private(alias.name):
                            found.append(f"{name}:{node.lineno}: from {base} import {alias.name}")
            for node in ast.walk(tree):
                if isinstance(node, ast.Attribute) and _private(node.attr):
                    owner = self._module_named(node.value, aliases)
                    if owner is not None and owner != name:
                        found.append(f"{name}:{node.lineno}: {owner}.{node.attr}")
        return found

    def _module_named(self, node: ast.expr, aliases: dict[str, str]) -> str | None:
        """The project module an expression such as ``m`` or ``a.b`` names through ``aliases``, else None."""
        if isinstance(node, ast.Name):
            return aliases.get(node.id)
        if isinstance(node, ast.Attribute):
            owner = self._module_named(node.value, aliases)
            if owner is not None and f"{owner}.{node.attr}" in self.modules:
                return f"{owner}.{node.attr}"
        return None


def _literal_import_module(node: ast.Call) -> bool:
    """True for ``importlib.import_module("a.b")`` / ``import_module("a.b")`` with one literal name."""
    f = node.func
    named = (isinstance(f, ast.Attribute) and f.attr == "import_module") or \
        (isinstance(f, ast.Name) and f.id == "import_module")
    return named and len(node.args) == 1 and isinstance(node.args[0], ast.Constant) and \
        isinstance(node.args[0].value, str)


def _private(attr: str) -> bool:
    return attr.startswith("_") and not (attr.startswith("__") and attr.endswith("__"))


def tangles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm), each sorted, in sorted order:
    every module of one can reach every other through imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return sorted(components)


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle ``[a, b, ..., a]`` per component of ``tangles``: a shortest one through its first module."""
    return [_cycle_through(graph, comp) for comp in tangles(graph)]


def _cycle_through(graph: dict[str, dict[str, int]], component: list[str]) -> list[str]:
    """A shortest cycle inside ``component`` through its first module (breadth-first search back to it)."""
    start, members = component[0], set(component)
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return path[::-1] + [start]
                if w in members and w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start} in {component}")


def describe(cycle: list[str], graph: dict[str, dict[str, int]]) -> str:
    """``a (line 3) -> b; b (line 7) -> a`` for a cycle ``[a, b, a]``."""
    return "; ".join(f"{a} (line {graph[a][b]}) -> {b}" for a, b in zip(cycle, cycle[1:]))


PROJECT = Project(project_modules())
MODULES = PROJECT.modules


# ---- the checks ----------------------------------------------------------------------------------------------------

def test_the_module_list_covers_the_project():
    assert {"train", "engine", "engine.synth", "engine.loader", "engine.loader.dali", "kernels",
            "kernels.rain_streak", "models", "models.unet", "engine.bench.timing"} <= set(MODULES)


def test_no_import_cycles():
    graph = PROJECT.graph()
    found = [f"{', '.join(comp)}: {describe(cycle, graph)}" for comp, cycle in zip(tangles(graph), find_cycles(graph))]
    assert not found, "modules that import one another (a cycle in each):\n" + "\n".join(found)


def test_no_private_names_from_other_modules():
    found = PROJECT.private_imports()
    assert not found, "private names imported from another module:\n" + "\n".join(found)


@pytest.mark.slow
@pytest.mark.parametrize("order", ["sorted", "reversed"])
def test_every_module_imports_in_a_fresh_interpreter(order):
    names = sorted(MODULES, reverse=order == "reversed")
    script = ("import importlib, sys, traceback\n"
              "bad = []\n"
              f"for name in {names!r}:\n"
              "    try:\n"
              "        importlib.import_module(name)\n"
              "    except BaseException:\n"
              "        bad.append(name + ': ' + traceback.format_exc(limit=-3))\n"
              "print('\\n'.join(bad))\n"
              "sys.exit(1 if bad else 0)\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, f"modules that failed to import ({order} order):\n{res.stdout}\n{res.stderr[-3000:]}"


# ---- the checks check ----------------------------------------------------------------------------------------------

def _made_up(sources: dict[str, str], tmp_path: Path) -> Project:
    for rel, text in sources.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return Project(project_modules(tmp_path))


def test_the_checks_on_a_made_up_project(tmp_path):
    project = _made_up({
        "engine/__init__.py": '"""Docstring."""\nfrom engine.a import f\n__all__ = ["f"]\n',
        "engine/a.py": "from engine import f\nimport engine.b\n",  # its own re-exporting __init__: no edge
        "engine/b.py": "def g():\n    from . import c\n",  # relative, inside a function
        "engine/c.py": "import importlib\nimportlib.import_module('engine.a')\n",  # a -> b -> c -> a
        "engine/pkg/__init__.py": "from engine.pkg.d import X\nY = 1\n",
        "engine/pkg/d.py": "from engine.pkg import Y\nX = 2\n",  # needs a name its __init__ defines
        "kernels/__init__.py": "",
        "kernels/e.py": "from kernels.f import _hidden, shown\nimport kernels.f as F\nF._other()\nF.__name__\n",
        "kernels/f.py": "import engine.pkg.d\n",  # implicit edges to engine and engine.pkg
        "models/__init__.py": "from .h import H\n",
        "models/h.py": "H = 1\n",
        "models/sub/__init__.py": "",
        "models/sub/g.py": "from .. import h\n",  # level 2: models.h
    }, tmp_path)
    graph = project.graph()
    assert graph["engine.a"] == {"engine.b": 2} and graph["engine.b"] == {"engine.c": 2}
    assert graph["engine.c"] == {"engine.a": 2}
    assert set(graph["kernels.f"]) == {"engine", "engine.pkg", "engine.pkg.d"}
    assert graph["models"] == {"models.h": 1} and graph["models.sub.g"] == {"models.h": 1}
    assert tangles(graph) == [["engine.a", "engine.b", "engine.c"], ["engine.pkg", "engine.pkg.d"]]
    assert find_cycles(graph) == [["engine.a", "engine.b", "engine.c", "engine.a"],
                                  ["engine.pkg", "engine.pkg.d", "engine.pkg"]]
    assert describe(["engine.pkg", "engine.pkg.d", "engine.pkg"], graph) == \
        "engine.pkg (line 1) -> engine.pkg.d; engine.pkg.d (line 1) -> engine.pkg"
    assert project.private_imports() == ["kernels.e:1: from kernels.f import _hidden", "kernels.e:3: kernels.f._other"]
