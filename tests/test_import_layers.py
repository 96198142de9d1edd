"""No import circle among the modules of corrpo, corrpo-server and corrpo-kernels, and the
backends of token_stats (``corrpo._cpu``, ``corrpo._triton``) below their dispatchers
(``corrpo.stats``, ``corrpo.from_hidden``): a backend that reaches back into a dispatcher
is how data came to walk up and down between them.

The graph is read from the source with ``ast``, imports inside functions included (a lazy
import closes a circle as surely as a top-level one, only later); imports under
``if TYPE_CHECKING:`` never run and are left out."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = (ROOT / "python" / "corrpo", ROOT / "server" / "corrpo_server", ROOT / "kernels" / "corrpo_kernels")
BACKENDS = ("corrpo._cpu", "corrpo._triton")
DISPATCHERS = ("corrpo", "corrpo.stats", "corrpo.from_hidden")


def module_name(path: Path, package: Path) -> str:
    parts = list(path.relative_to(package.parent).parts)
    parts[-1] = parts[-1].split(".")[0]  # stats.py, _native.abi3.so
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement that can run, at any depth."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            for child in node.orelse:
                visit(child)
            return
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph(packages: tuple[Path, ...]) -> dict[str, set[str]]:
    """module -> the modules of `packages` it imports. ``from .x import y`` counts as an
    import of ``x.y`` where that is a module and of ``x`` otherwise; ``from . import m`` of
    ``m`` alone, as Python runs the package's ``__init__`` before any of its modules."""
    sources = {module_name(p, pkg): p for pkg in packages for p in pkg.rglob("*.py")}
    native = {module_name(p, pkg) for pkg in packages for ext in ("*.so", "*.pyd") for p in pkg.rglob(ext)}
    modules = set(sources) | native  # corrpo._native: built by `make native`
    graph = {}
    for name, path in sources.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
                continue
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            source = ".".join(part for part in (base if node.level else "", node.module or "") if part)
            targets |= {f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None."""
    state: dict[str, str] = {}  # "open" while on the path, then "done"
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for target in graph.get(todo.pop(), ()):
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def test_no_import_circle():
    graph = import_graph(PACKAGES)
    assert {"corrpo.stats", "corrpo_server.app", "corrpo_kernels.launch"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_backends_sit_below_the_dispatchers():
    graph = import_graph(PACKAGES)
    # The dispatchers hand work down to both backends; the Triton backend asks the native one
    # to explain a row its kernel flagged.
    for dispatcher in ("corrpo.stats", "corrpo.from_hidden"):
        assert {"corrpo._cpu", "corrpo._triton"} <= graph[dispatcher]
    assert "corrpo._cpu" in graph["corrpo._triton"]
    for backend in BACKENDS:
        above = reachable(graph, backend) & set(DISPATCHERS)
        assert not above, f"{backend} imports {sorted(above)}, which dispatch to it"


def test_the_check_sees_a_circle_closed_by_a_lazy_import(tmp_path):
    """What stats.py and _triton.py once were: a top-level import one way, a function-level
    import back; and an import under TYPE_CHECKING, which never runs, is no circle."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("from .dispatch import run\n")
    (package / "dispatch.py").write_text("def run():\n    from . import backend\n    return backend.go()\n")
    (package / "backend.py").write_text("from .dispatch import run as again\n")
    (package / "typed.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .hinted import X\n"
    )
    (package / "hinted.py").write_text("from . import typed\n")
    graph = import_graph((package,))
    assert graph["pkg.typed"] == set() and graph["pkg.hinted"] == {"pkg.typed"}
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1] and set(cycle) == {"pkg.dispatch", "pkg.backend"}
    assert "pkg.dispatch" in reachable(graph, "pkg.backend")


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def script_imports(path: Path) -> set[str]:
    """The modules a script (absolute imports only) names, with every package above them."""
    names = set()
    for node in _imports(ast.parse(path.read_text(), str(path))):
        found = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
        if isinstance(node, ast.ImportFrom):
            found += [f"{node.module}.{a.name}" for a in node.names]
        names |= set(found)
    return names


#: Scripts about the trainer itself: they build its model and time its own signals.
TRAINER_SCRIPTS = ("bench/bench_train_signals.py",)


def test_nothing_outside_the_trainer_imports_it():
    """corrpo.train is the reference trainer, one user of corrpo among others: it writes its
    checkpoints as Hugging Face directories that corrpo.models loads, so neither corrpo's
    modules, the server, the kernels, nor the benchmarks and examples need its internals
    (its Transformer, model sizes, task)."""
    graph = import_graph(PACKAGES)
    assert "corrpo.train.hf" in graph and "corrpo.models" in graph
    library = {m: sorted(t for t in targets if _within(t, "corrpo.train")) for m, targets in graph.items() if not _within(m, "corrpo.train")}
    assert {m: t for m, t in library.items() if t} == {}
    scripts = [p for folder in ("bench", "examples") for p in sorted((ROOT / folder).rglob("*.py"))]
    assert ROOT / TRAINER_SCRIPTS[0] in scripts
    users = {str(p.relative_to(ROOT)) for p in scripts if any(_within(m, "corrpo.train") for m in script_imports(p))}
    assert users == set(TRAINER_SCRIPTS)


def test_the_model_loader_knows_neither_the_fingerprint_tool_nor_the_trainer():
    """Every caller loads models through corrpo.models, so it sits below all of them."""
    graph = import_graph(PACKAGES)
    above = {m for m in reachable(graph, "corrpo.models") if _within(m, "corrpo.fingerprinting") or _within(m, "corrpo.train")}
    assert above == set()
    # The check sees such an import: the trainer's own conversion does reach the trainer.
    assert "corrpo.train.model" in reachable(graph, "corrpo.train.hf")
