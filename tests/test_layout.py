"""The package's shape, checked statically: who imports whom inside `vlp_cli`.

Every `.py` file under `vlp_cli/` is parsed with `ast` (nothing is imported or executed) and
every import in it is collected, at module level or inside a function, class or `if` block
(`TYPE_CHECKING` ones included: a cycle only a type checker sees is still a cycle in the
design). An import names a vlp_cli module as follows:

* `import a.b.c` names `a.b.c`;
* `from a.b import c` names `a.b.c` when that is a module (`from vlp_cli.stages import
  corpus`), else `a.b` (`from vlp_cli.stores.features import Regions`);
* relative imports are resolved against the importing module's package first.

Importing `a.b.c` also runs `a/__init__.py` and `a/b/__init__.py`. Those implicit edges are
left out of the graph: counted, every package whose `__init__` imports one of its own
submodules (the `vlp_cli.benches` registry does) would sit on a false cycle with each of its
submodules. Package `__init__` modules are otherwise ordinary nodes: what they import
explicitly is counted like any other module's imports.

The rules:

(a) no import cycle among vlp_cli modules;
(b) a stage (`vlp_cli/stages/*.py`) imports no other stage; `stages.common` and the package
    itself are shared ground, not stages;
(c) nothing in `vlp_cli/stores/` imports torch (the on-disk contracts stay loadable without it);
(d) nothing imports pickle (nor its wrappers: restoring state never executes code).

Known offenders that only another piece of work can remove are listed in the allow-lists
below, each with why it is there; an entry that no longer matches anything fails the test, so
the list cannot outlive the offence.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "vlp_cli"

# (importer, imported) edges that (a) or (b) would flag but are tolerated for now, each with a
# comment naming the work that removes it, e.g. "(removed by the task-module refactor)".
# Empty: nothing is tolerated today.
KNOWN_STAGE_IMPORTS: set[tuple[str, str]] = set()
KNOWN_CYCLE_EDGES: set[tuple[str, str]] = set()

PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "shelve", "joblib"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path, name: str, modules: set[str]) -> tuple[set[str], set[str]]:
    """(vlp_cli modules, top-level names of everything) that the file at `path` imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    internal: set[str] = set()
    external: set[str] = set()

    def add(target: str) -> None:
        external.add(target.split(".")[0])
        if target in modules:
            internal.add(target)

    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            for alias in node.names:
                sub = f"{origin}.{alias.name}"
                add(sub if sub in modules else origin)
    return internal, external


def _graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(vlp_cli module -> vlp_cli modules it imports, module -> top-level names it imports)."""
    modules = _modules()
    graph, names = {}, {}
    for name, path in modules.items():
        internal, external = _imports(path, name, set(modules))
        graph[name] = internal - {name}
        names[name] = external
    return graph, names


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a -> ... -> a) per strongly connected component that has one (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)

    cycles = []
    for comp in components:
        # A shortest way back to the start, within the component: the cycle to report.
        start = min(comp)
        paths = {start: [start]}
        frontier = [start]
        while frontier and start not in {w for v in frontier for w in graph[v]}:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v] & comp):
                    if w not in paths:
                        paths[w] = paths[v] + [w]
                        nxt.append(w)
            frontier = nxt
        last = next(v for v in frontier if start in graph[v])
        cycles.append(paths[last] + [start])
    return cycles


def _stage(name: str) -> bool:
    return name.startswith("vlp_cli.stages.") and name != "vlp_cli.stages.common"


def test_the_parser_counts_every_kind_of_import(tmp_path: Path) -> None:
    """Lazy and relative imports count; `from pkg import module` names the module."""
    src = tmp_path / "caption.py"
    src.write_text(
        "import torch.nn\n"
        "from vlp_cli.stages import common, run_it\n"
        "from . import extract\n"
        "from ..stores.features import Regions\n"
        "def f():\n"
        "    import pickle\n"
        "    from vlp_cli.extractors import pipeline\n", encoding="utf-8")
    internal, external = _imports(src, "vlp_cli.stages.caption", set(_modules()))
    assert internal == {"vlp_cli.stages.common", "vlp_cli.stages", "vlp_cli.stages.extract",
                        "vlp_cli.stores.features", "vlp_cli.extractors.pipeline"}
    assert external == {"torch", "vlp_cli", "pickle"}


def test_a_cycle_is_reported_as_a_path() -> None:
    graph = {"a": {"b"}, "b": {"c", "d"}, "c": {"a"}, "d": set(), "e": {"a"}}
    assert _cycles(graph) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles() -> None:
    graph, _ = _graph()
    pruned = {v: {w for w in ws if (v, w) not in KNOWN_CYCLE_EDGES} for v, ws in graph.items()}
    cycles = _cycles(pruned)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)
    stale = {e for e in KNOWN_CYCLE_EDGES if e[1] not in graph.get(e[0], set())}
    assert not stale, f"KNOWN_CYCLE_EDGES entries that no longer exist: {sorted(stale)}"


def test_stages_do_not_import_each_other() -> None:
    graph, _ = _graph()
    found = {(v, w) for v, ws in graph.items() if _stage(v) for w in ws if _stage(w)}
    unexpected = found - KNOWN_STAGE_IMPORTS
    assert not unexpected, (
        "stage modules importing other stages (move the shared code into stages/common.py or "
        "a lower package): " + ", ".join(f"{v} -> {w}" for v, w in sorted(unexpected)))
    stale = KNOWN_STAGE_IMPORTS - found
    assert not stale, f"KNOWN_STAGE_IMPORTS entries that no longer exist: {sorted(stale)}"


def test_stores_do_not_import_torch() -> None:
    _, names = _graph()
    offenders = sorted(m for m, ns in names.items()
                       if m.startswith("vlp_cli.stores") and "torch" in ns)
    assert not offenders, f"vlp_cli.stores modules importing torch: {offenders}"


# The one exception: RefCOCO's refs file is a Python 2 pickle, read by a restricted unpickler
# that builds containers only (tests/test_resume.py checks that it calls nothing else).
RESTRICTED_UNPICKLER = "vlp_cli.readers.refcoco"


def test_nothing_imports_pickle() -> None:
    _, names = _graph()
    offenders = {m: sorted(ns & PICKLE_MODULES) for m, ns in names.items()
                 if ns & PICKLE_MODULES and not (m == RESTRICTED_UNPICKLER and ns & PICKLE_MODULES
                                                  == {"pickle"})}
    assert not offenders, f"modules importing pickle or a wrapper of it: {offenders}"
