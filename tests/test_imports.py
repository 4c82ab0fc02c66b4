"""The package's modules form no import cycle (docs/design.md §2: data flows one way).

The graph comes from every import statement in pretrain/, including those inside functions
(a lazy import still ties the two modules together). An edge goes to the module an import
names: `from pretrain.metrics import RotationTracker` is an edge to pretrain/metrics/__init__.py,
`from pretrain import config` one to pretrain/config.py.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "pretrain"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{path}: a relative import; the package imports absolutely"
                base = node.module or ""
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            graph[name] |= {target for target in targets if target in files and target != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.add(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_sees_the_imports():
    graph = import_graph()
    assert "pretrain.config" in graph["pretrain.train"]  # a top-level import
    assert "pretrain.config" in graph["pretrain.config_doc"]  # `from pretrain import config`
    assert "pretrain.train" in graph["pretrain.study_run"]  # an import inside a function
    assert "pretrain.metrics" in graph["pretrain.train"]  # a package's __init__


def test_a_cycle_is_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


def test_pretrain_has_no_import_cycle():
    found = cycles(import_graph())
    assert not found, f"import cycles: {[sorted(c) for c in found]}"


def test_the_strategy_layer_does_not_import_the_metrics():
    graph = import_graph()
    parallel = [name for name in graph if name.startswith("pretrain.parallel")]
    assert parallel
    for name in parallel:
        assert not {t for t in graph[name] if t.startswith("pretrain.metrics")}, name
