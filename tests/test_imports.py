"""The package's import graph, read from the source (every import statement, those inside
functions and under TYPE_CHECKING included): no cycles, and only the command line imports
the command line."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "mlx_kvshard"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, path.name == "__init__.py", node)
                # `from . import x` imports the submodule x when there is one
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in modules:  # `import a.b.c` where c is an attribute: the module a.b
                    t = t.rpartition(".")[0]
                if t and t != name and t.startswith("mlx_kvshard"):
                    graph[name].add(t)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_graph_reads_the_package():
    graph = import_graph()
    assert "mlx_kvshard.cli" in graph and "mlx_kvshard.launch.runner" in graph
    assert "mlx_kvshard.launch.spec" in graph["mlx_kvshard.launch.runner"]
    assert "mlx_kvshard.cli.generate" in graph["mlx_kvshard.cli"]  # `from . import generate as ...`


def test_cycle_finder_finds_a_lazy_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    # A package's __init__ importing its own submodules is not a cycle of modules;
    # __init__ files here import nothing of their subpackage anyway.
    cycles = _cycles(import_graph())
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_only_the_command_line_imports_the_command_line():
    graph = import_graph()
    offenders = sorted(f"{m} imports {t}" for m, ts in graph.items() for t in ts
                       if t.split(".")[:2] == ["mlx_kvshard", "cli"]
                       and m.split(".")[:2] != ["mlx_kvshard", "cli"] and m != "mlx_kvshard.__main__")
    assert not offenders, "runtime modules import the command line: " + "; ".join(offenders)


def test_the_runtime_imports_no_planner():
    """The engine and the serving engine sit below the planner: the link cost model they
    share lives in mlx_kvshard.hardware, under both."""
    graph = import_graph()
    below = ("engine", "serving", "hardware", "models")
    offenders = sorted(f"{m} imports {t}" for m, ts in graph.items() for t in ts
                       if t.split(".")[:2] == ["mlx_kvshard", "planner"] and m.split(".")[1:2] and
                       m.split(".")[1] in below)
    assert not offenders, "runtime modules import the planner: " + "; ".join(offenders)
