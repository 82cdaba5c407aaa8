"""No import cycles inside lla/: the module graph built from every ``import`` / ``from ... import`` statement,
function-level imports included (a lazy import is still a dependency; it only hides the cycle until run time)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(root: Path, package: str = "lla") -> dict[str, set[str]]:
    """``module -> modules of `package` it imports``, from the source of every ``.py`` file under root/package.

    ``from a.b import c`` is an edge to ``a.b.c`` when that is a module, else to ``a.b``; relative imports are
    resolved; imports inside functions, classes and ``if`` blocks count like top-level ones.
    """
    files = {module_name(p, root): p for p in sorted((root / package).rglob("*.py"))}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".") if is_package else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            for target in targets:
                while target and target not in files and "." in target:  # import a.b.c where only a.b is ours
                    target = target.rsplit(".", 1)[0]
                if target in files and target != name:
                    graph[name].add(target)
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (each one or more cycles), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan; the graph is small (~100 modules), recursion is fine
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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def simple_cycles(graph: dict[str, set[str]]) -> list[tuple[str, ...]]:
    """Every elementary cycle, each once, as a tuple that starts at its smallest module (``a -> b -> a`` is
    ``("a", "b")``); only inside the components :func:`import_cycles` finds, so the search stays small."""
    out: list[tuple[str, ...]] = []

    def walk(path: list[str], members: set[str]) -> None:  # cycles whose smallest module is path[0]
        for w in sorted(graph[path[-1]] & members):
            if w == path[0]:
                out.append(tuple(path))
            elif w > path[0] and w not in path:
                walk([*path, w], members)

    for component in import_cycles(graph):
        for start in component:
            walk([start], set(component))
    return sorted(out)


def show(cycle: tuple[str, ...]) -> str:
    return " -> ".join([*cycle, cycle[0]])


def test_the_cycle_finder_sees_function_level_and_relative_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..a import x\n")  # lazy + relative: still a cycle
    (pkg / "c.py").write_text("import pkg.a\nimport os\n")
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.a"] == {"pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.a"} and graph["pkg.c"] == {"pkg.a"}
    assert import_cycles(graph) == [["pkg.a", "pkg.sub.b"]]
    assert simple_cycles(graph) == [("pkg.a", "pkg.sub.b")]
    graph["pkg.a"].add("pkg.c")  # a second cycle through pkg.a: a -> c -> a
    assert [show(c) for c in simple_cycles(graph)] == ["pkg.a -> pkg.c -> pkg.a", "pkg.a -> pkg.sub.b -> pkg.a"]


def test_no_import_cycles_in_lla():
    graph = import_graph(ROOT)
    assert len(graph) > 50 and "lla.engine" in graph["lla.methods.man"]
    cycles = [show(c) for c in simple_cycles(graph)]
    assert not cycles, "import cycles inside lla/: " + "; ".join(cycles)


RUNTIME = ("lla.engine", "lla.optim", "lla.checkpointing", "lla.distributed", "lla.recompute", "lla.callbacks",
           "lla.memory", "lla.loggers", "lla.naming", "lla.compat", "lla.ema")
ABOVE_RUNTIME = ("lla.cli", "lla.build", "lla.evaluate", "lla.report", "lla.bench", "lla.demo")


def test_runtime_never_imports_the_entry_point_or_the_tools():
    graph = import_graph(ROOT)
    for start in RUNTIME:
        seen, todo = set(), [start]
        while todo:  # everything start imports, directly or through other modules
            for dep in graph.get(todo.pop(), ()):
                if dep not in seen:
                    seen.add(dep)
                    todo.append(dep)
        above = sorted(m for m in seen if m.startswith(ABOVE_RUNTIME))
        assert not above, f"{start} imports {above}"
