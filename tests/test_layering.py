"""Import layering: model code never imports the application, and no import cycles exist.

Module-level imports only (imports inside functions are deliberate late
imports, for start-up time or optional dependencies; ``if TYPE_CHECKING:``
blocks are typing only).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "streamcap"

# What code under streamcap.models may import from streamcap: itself and the shared
# leaf modules every layer uses.
MODELS_MAY_IMPORT = ("streamcap.models", "streamcap.errors", "streamcap.messages",
                     "streamcap.logs", "streamcap.options")

# Known violations still to remove; nothing may be added here.
KNOWN: set[str] = set()


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(tree: ast.Module, module: str, is_package: bool) -> Iterator[str]:
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for sub in ast.walk(node) if isinstance(node, ast.If | ast.Try) else [node]:
            if isinstance(sub, ast.Import):
                yield from (alias.name for alias in sub.names)
            elif isinstance(sub, ast.ImportFrom):
                if sub.level:
                    base = module.split(".")
                    base = base[: len(base) - sub.level + (1 if is_package else 0)]
                    target = ".".join([*base, sub.module] if sub.module else base)
                else:
                    target = sub.module or ""
                yield target
                yield from (f"{target}.{alias.name}" for alias in sub.names)


def import_graph() -> dict[str, set[str]]:
    """streamcap module -> the streamcap modules it imports at module level."""
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(p): p for p in paths}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        targets = _top_level_imports(tree, name, path.name == "__init__.py")
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

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
    return found


def test_models_do_not_import_the_application() -> None:
    bad = sorted(
        f"{module} imports {target}"
        for module, targets in import_graph().items() if module.startswith("streamcap.models")
        for target in targets
        if not target.startswith(MODELS_MAY_IMPORT)
    )
    assert set(bad) - KNOWN == set(), "\n".join(bad)


def test_no_import_cycles() -> None:
    assert _cycles(import_graph()) == []


def test_the_checks_see_a_violation_and_a_cycle() -> None:
    graph = {"streamcap.models.x": {"streamcap.config"}, "streamcap.config": set(),
             "a": {"b"}, "b": {"a"}}
    assert _cycles(graph) == [["a", "b"]]
    assert import_graph()["streamcap.daemon"]  # the real graph is not empty
