"""The house rules, read from the source (`ast` of every module of postembed_fast/ and kernels/, which
ships as postembed_fast.kernels), so a wrong import fails here rather than in a review:

(a) the engine (the top-level modules of postembed_fast/, the package root, postembed_fast.kernels.*)
    never imports a system part (postembed_fast.search, .nearline, .backfill, .serve, .train), neither
    at module top nor inside a function. The one allowed edge is the package root's lazy
    `__getattr__` re-export of EmbeddingIndex / itq_rotation from postembed_fast.search.
(b) no import cycle among module-top imports (function-local imports run on first call, after every
    module is loaded, so they cannot deadlock an import and do not count).
(c) a system part never imports another system part's private (underscore) names or modules.

Shell modules (the command line) and the deprecated re-export shims may import system parts.
The checker is plain functions over {module name: parsed source}; the tests at the end run it on
synthetic modules to show it reports what it should.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "postembed_fast"
# Where each module tree lives in the repository, and the name it is imported by.
SOURCES = {PACKAGE: ROOT / "postembed_fast", f"{PACKAGE}.kernels": ROOT / "kernels"}

SYSTEM_PARTS = tuple(f"{PACKAGE}.{p}" for p in ("search", "nearline", "backfill", "serve", "train"))
SHELL = frozenset(f"{PACKAGE}.{m}" for m in ("cli", "cli_args", "options", "inputs", "__main__", "_deprecated"))
SHIMS = frozenset(f"{PACKAGE}.{m}" for m in ("index", "nearline_index"))  # deprecated re-exports of system parts
# The one engine -> system edge: (importer, imported module, the function it is in).
ALLOWED_ENGINE_TO_SYSTEM = {(PACKAGE, f"{PACKAGE}.search", "__getattr__")}


@dataclass(frozen=True)
class Import:
    importer: str
    target: str  # the internal module imported
    names: tuple[str, ...]  # names taken from it by `from target import ...` (empty for `import target`)
    function: str | None  # the enclosing function, None at module top (class bodies run at import too)
    line: int

    def __str__(self):
        where = "module top" if self.function is None else f"in {self.function}()"
        names = f" ({', '.join(self.names)})" if self.names else ""
        return f"{self.importer} -> {self.target}{names} [line {self.line}, {where}]"


# ---- reading the modules ---------------------------------------------------------------------------

def module_files() -> dict[str, tuple[Path, bool]]:
    """{dotted name: (file, is_package)} for every module of the package and of kernels/."""
    found = {}
    for prefix, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            if "__pycache__" in rel.parts:
                continue
            parts = list(rel.parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            name = ".".join([prefix, *parts])
            if prefix == PACKAGE and name.startswith(f"{PACKAGE}.kernels"):
                continue  # postembed_fast/kernels does not exist in the source tree; kernels/ is it
            found[name] = (path, is_package)
    return found


def parse_tree() -> dict[str, tuple[ast.Module, bool]]:
    return {name: (ast.parse(path.read_text(encoding="utf-8"), str(path)), pkg)
            for name, (path, pkg) in module_files().items()}


def _resolve_relative(importer: str, is_package: bool, level: int, module: str | None) -> str:
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _called_name(func: ast.expr) -> str | None:
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None


def imports_of(name: str, tree: ast.Module, is_package: bool, known: set[str]) -> list[Import]:
    """Every import of an internal module in `tree`, with the function it sits in (if any)."""
    found = []

    def visit(node, function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, child.name if function is None else f"{function}.{child.name}")
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.split(".")[0] == PACKAGE:
                        found.append(Import(name, alias.name, (), function, child.lineno))
            elif (isinstance(child, ast.Call) and _called_name(child.func) == "import_module" and child.args
                  and isinstance(child.args[0], ast.Constant) and isinstance(child.args[0].value, str)
                  and child.args[0].value.split(".")[0] == PACKAGE):  # importlib.import_module("postembed_fast.x")
                found.append(Import(name, child.args[0].value, (), function, child.lineno))
            elif isinstance(child, ast.ImportFrom):
                base = (_resolve_relative(name, is_package, child.level, child.module) if child.level
                        else child.module or "")
                if base.split(".")[0] != PACKAGE:
                    continue
                plain = []
                for alias in child.names:
                    if f"{base}.{alias.name}" in known:  # `from package import submodule`
                        found.append(Import(name, f"{base}.{alias.name}", (), function, child.lineno))
                    else:
                        plain.append(alias.name)
                if plain:
                    found.append(Import(name, base, tuple(plain), function, child.lineno))
            visit(child, function)

    visit(tree, None)
    return found


def all_imports(tree: dict[str, tuple[ast.Module, bool]]) -> list[Import]:
    known = set(tree)
    return [i for name, (mod, pkg) in tree.items() for i in imports_of(name, mod, pkg, known)]


# ---- the layers ------------------------------------------------------------------------------------

def system_part_of(module: str) -> str | None:
    return next((p for p in SYSTEM_PARTS if module == p or module.startswith(p + ".")), None)


def layer_of(module: str) -> str:
    if system_part_of(module):
        return "system"
    if module in SHELL:
        return "shell"
    if module in SHIMS:
        return "shim"
    if module == PACKAGE or module.startswith(f"{PACKAGE}.kernels") or module.count(".") == 1:
        return "engine"  # the package root, kernels, and every other top-level module
    return "unclassified"  # a new subpackage: name its layer above


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def engine_to_system(imports: list[Import]) -> list[Import]:
    return [i for i in imports if layer_of(i.importer) == "engine" and system_part_of(i.target)]


def private_across_parts(imports: list[Import]) -> list[Import]:
    """Imports by one system part of another part's underscore modules or names."""
    bad = []
    for i in imports:
        own, other = system_part_of(i.importer), system_part_of(i.target)
        if not own or not other or own == other:
            continue
        inside = i.target[len(other):].split(".")[1:]  # module path below the part's package
        if any(is_private(p) for p in inside) or any(is_private(n) for n in i.names):
            bad.append(i)
    return bad


def _dependencies(imports: list[Import], known: set[str]) -> dict[str, set[str]]:
    """Module-top import graph. Importing a.b.c also runs the packages a.b and a first, except the
    packages the importer is itself inside (Python has started those already)."""
    graph = {m: set() for m in known}
    for i in imports:
        if i.function is not None:
            continue
        parts = i.target.split(".")
        for n in range(1, len(parts) + 1):
            target = ".".join(parts[:n])
            if target in known and target != i.importer and not i.importer.startswith(target + "."):
                graph[i.importer].add(target)
    return graph


def import_cycles(imports: list[Import], known: set[str]) -> list[list[str]]:
    """One cycle (a -> b -> ... -> a) per strongly connected group of modules."""
    graph = _dependencies(imports, known)
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def strongconnect(v):  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1 or v in graph[v]:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    cycles = []
    for group in groups:  # a shortest way back to the smallest member, within the group
        start = min(group)
        paths, seen = {start: [start]}, {start}
        frontier = [start]
        while frontier and start not in [w for v in frontier for w in graph[v]]:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v] & group - seen):
                    seen.add(w)
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
            frontier = nxt
        last = next(v for v in frontier if start in graph[v])
        cycles.append(paths[last] + [start])
    return cycles


def _listing(items) -> str:
    return "\n  " + "\n  ".join(map(str, items))


# ---- the rules on the real source ------------------------------------------------------------------

TREE = parse_tree()
IMPORTS = all_imports(TREE)


def test_every_module_is_read_and_has_a_layer():
    assert {"postembed_fast", "postembed_fast.embedder", "postembed_fast.kernels", "postembed_fast.kernels.dispatch",
            "postembed_fast.search.index", "postembed_fast.nearline.worker"} <= set(TREE)
    unclassified = sorted(m for m in TREE if layer_of(m) == "unclassified")
    assert not unclassified, f"modules of no layer (add them to SYSTEM_PARTS, SHELL or SHIMS):{_listing(unclassified)}"
    # relative imports are mapped: kernels/dispatch.py does `from . import _ext`
    assert any(i.importer == "postembed_fast.kernels.dispatch" and i.target == "postembed_fast.kernels._ext"
               for i in IMPORTS)


def test_the_engine_never_imports_a_system_part():
    edges = engine_to_system(IMPORTS)
    extra = [i for i in edges if (i.importer, i.target, i.function) not in ALLOWED_ENGINE_TO_SYSTEM]
    assert not extra, f"engine modules importing system parts:{_listing(extra)}"
    # the allowed edge is the lazy re-export, and it takes nothing but the search module
    allowed = [i for i in edges if (i.importer, i.target, i.function) in ALLOWED_ENGINE_TO_SYSTEM]
    assert [(i.importer, i.target, i.function) for i in allowed] == sorted(ALLOWED_ENGINE_TO_SYSTEM), allowed
    import postembed_fast
    import postembed_fast.search

    assert postembed_fast.EmbeddingIndex is postembed_fast.search.EmbeddingIndex
    assert postembed_fast.itq_rotation is postembed_fast.search.itq_rotation


def test_no_import_cycle_among_module_top_imports():
    cycles = import_cycles(IMPORTS, set(TREE))
    assert not cycles, "import cycles (module-top imports):" + _listing(" -> ".join(c) for c in cycles)


def test_system_parts_take_no_private_names_of_each_other():
    bad = private_across_parts(IMPORTS)
    assert not bad, f"system parts importing another part's private names:{_listing(bad)}"


# ---- the checker can fail ------------------------------------------------------------------------

def _synthetic(sources: dict[str, str], packages=()) -> tuple[dict, list[Import]]:
    tree = {name: (ast.parse(src), name in packages) for name, src in sources.items()}
    return tree, all_imports(tree)


def test_checker_reports_a_cycle_and_an_engine_to_system_edge():
    tree, imports = _synthetic({
        "postembed_fast": "from postembed_fast.embedder import Embedder\n",
        "postembed_fast.embedder": "from postembed_fast import head\n",
        "postembed_fast.head": "import postembed_fast.model\n",
        "postembed_fast.model": ("from postembed_fast.embedder import Embedder\n"  # head -> model -> embedder
                                 "def f():\n    from postembed_fast.search import EmbeddingIndex\n"),
        "postembed_fast.kernels": "from . import dispatch\n",
        "postembed_fast.kernels.dispatch": "from .. import search\n",  # relative, two levels up
        "postembed_fast.search": "from postembed_fast import kernels\n",
        "postembed_fast.loading": "def g():\n    from postembed_fast import model, head\n",
        "postembed_fast.graphs": "import importlib\nrecipe = importlib.import_module('postembed_fast.train.recipe')\n",
    }, packages=("postembed_fast", "postembed_fast.kernels", "postembed_fast.search"))
    cycles = import_cycles(imports, set(tree))
    as_text = sorted(" -> ".join(c) for c in cycles)
    assert as_text == [
        "postembed_fast.embedder -> postembed_fast.head -> postembed_fast.model -> postembed_fast.embedder",
        "postembed_fast.kernels -> postembed_fast.kernels.dispatch -> postembed_fast.search -> postembed_fast.kernels",
    ], as_text
    edges = sorted(str(i) for i in engine_to_system(imports))
    assert edges == [
        "postembed_fast.graphs -> postembed_fast.train.recipe [line 2, module top]",
        "postembed_fast.kernels.dispatch -> postembed_fast.search [line 1, module top]",
        "postembed_fast.model -> postembed_fast.search (EmbeddingIndex) [line 3, in f()]",
    ], edges


def test_checker_ignores_lazy_imports_and_packages_already_being_imported():
    tree, imports = _synthetic({
        "postembed_fast": "from postembed_fast.embedder import Embedder\n"
                          "def __getattr__(name):\n    from postembed_fast import search\n",
        "postembed_fast.embedder": "from postembed_fast import model\n",
        "postembed_fast.model": "def f():\n    from postembed_fast.embedder import Embedder\n",
        "postembed_fast.search": "from postembed_fast.search.index import EmbeddingIndex\n",
        "postembed_fast.search.index": "from postembed_fast.search import helpers\n"
                                       "from postembed_fast import embedder\n",
        "postembed_fast.search.helpers": "",
    }, packages=("postembed_fast", "postembed_fast.search"))
    assert import_cycles(imports, set(tree)) == []
    assert [(i.importer, i.target, i.function) for i in engine_to_system(imports)] == sorted(ALLOWED_ENGINE_TO_SYSTEM)


def test_checker_reports_private_names_across_system_parts():
    _, imports = _synthetic({
        "postembed_fast.backfill.load": "from postembed_fast.nearline.store import _RANGES_INFIX, key_of\n"
                                        "from postembed_fast.nearline import _internal\n"
                                        "from postembed_fast.backfill.job import _private_of_its_own\n",
        "postembed_fast.serve.app": "def f():\n    import postembed_fast.search._scan\n",
        "postembed_fast.nearline.store": "", "postembed_fast.nearline._internal": "",
        "postembed_fast.backfill.job": "", "postembed_fast.search._scan": "",
    })
    bad = sorted(str(i) for i in private_across_parts(imports))
    assert bad == [
        "postembed_fast.backfill.load -> postembed_fast.nearline._internal [line 2, module top]",
        "postembed_fast.backfill.load -> postembed_fast.nearline.store (_RANGES_INFIX, key_of) [line 1, module top]",
        "postembed_fast.serve.app -> postembed_fast.search._scan [line 2, in f()]",
    ], bad
