"""The package's shape: no import cycle between its modules, the CLI imported by nobody, no dead entry points."""

from __future__ import annotations

import ast
from pathlib import Path

import autosearch

PKG = Path(autosearch.__file__).parent


def _module(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every autosearch module ``path`` imports, at module level or inside a function (not the
    ``if TYPE_CHECKING:`` imports, which never run)."""
    mod = _module(path)
    out: set[str] = set()
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
                   for n in ast.walk(block)}
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("autosearch")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative
                pkg = mod.split(".")[: -node.level] if path.name != "__init__.py" else mod.split(".")[: len(mod.split(".")) - node.level + 1]
                base = ".".join([*pkg, *([base] if base else [])])
            if base.startswith("autosearch"):
                out.add(base)
                out |= {f"{base}.{a.name}" for a in node.names}
    return out


def _graph() -> dict[str, set[str]]:
    files = {_module(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        deps = {d for d in _imports(path) if d in files and d != mod}
        # importing a package runs its __init__, so a submodule import depends on its parents too
        deps |= {".".join(d.split(".")[:i]) for d in deps for i in range(2, len(d.split(".")))} & set(files)
        graph[mod] = deps - {mod} - {p for p in files if mod.startswith(p + ".")}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if m == "autosearch":
                continue  # the top-level package re-exports; nothing inside imports it for its own use
            if state.get(m) == 1:
                return [*stack[stack.index(m):], m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_the_import_graph_has_no_cycle() -> None:
    """Counting imports inside functions too: a lazy import that closes a circle is still a circle."""
    cycle = _cycle(_graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_no_module_imports_the_cli() -> None:
    graph = _graph()
    users = sorted(m for m, deps in graph.items() if "autosearch.cli" in deps and m != "autosearch.__main__")
    assert users == []


def test_the_cycle_check_sees_a_lazy_back_edge() -> None:
    graph = _graph()
    graph["autosearch.model"] = {*graph["autosearch.model"], "autosearch.study"}
    assert _cycle(graph) is not None
