"""The package's layers, checked from its imports: no cycles, and no import from a lower layer up.

The layer order is written here once. Every import in condaproxy/ counts, including those
made inside functions or under `if TYPE_CHECKING:`, because each of them ties one module to
another as much as any other import does.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "condaproxy"

# Lowest first. A module may import its own layer and those before it; "base" is what every
# layer shares: the package root (its version), errors and the metrics registry.
LAYERS: tuple[tuple[str, frozenset[str]], ...] = (
    ("base", frozenset({"condaproxy", "condaproxy.errors", "condaproxy.metrics"})),
    ("conda", frozenset({"condaproxy.conda"})),
    ("store", frozenset({"condaproxy.store"})),
    ("config", frozenset({"condaproxy.config"})),
    ("upstream", frozenset({"condaproxy.upstream"})),
    ("cache", frozenset({"condaproxy.cache"})),
    ("http", frozenset({"condaproxy.http"})),
    ("ops", frozenset({"condaproxy.ops"})),
    ("top", frozenset({"condaproxy.app", "condaproxy.cli", "condaproxy.__main__"})),
)
# Layers that stand side by side: neither may import the other (conda knowledge and blob
# storage know nothing of each other).
SIDE_BY_SIDE = frozenset({frozenset({"conda", "store"})})


def module_name(path: Path) -> str:
    """condaproxy/cache/catalog/db.py -> condaproxy.cache.catalog.db (packages without .__init__)."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    """Every module of the package, by dotted name."""
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str, path: Path, known: set[str]) -> Iterator[str]:
    """The condaproxy modules that module `name` imports (a package counts as its __init__)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # `from a import b` imports the module a.b when there is one, else a name of a.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        for target in targets:
            if target == "condaproxy" or target.startswith("condaproxy."):
                yield target


def layer_of(name: str) -> int:
    """The index in LAYERS of the layer a module belongs to."""
    for index, (_, roots) in enumerate(LAYERS):
        if any(name == root or name.startswith(root + ".") for root in roots if root != "condaproxy"):
            return index
        if name == "condaproxy" and "condaproxy" in roots:
            return index
    raise AssertionError(f"{name} belongs to no layer: add it to LAYERS in {__file__}")


def graph() -> dict[str, set[str]]:
    """Module -> the condaproxy modules it imports."""
    found = modules()
    known = set(found)
    return {name: set(imports(name, path, known)) - {name} for name, path in found.items()}


def test_every_module_has_a_layer() -> None:
    for name in modules():
        layer_of(name)


def test_no_import_goes_up_a_layer_or_sideways() -> None:
    wrong = []
    for name, targets in graph().items():
        mine = layer_of(name)
        for target in sorted(targets):
            theirs = layer_of(target)
            pair = frozenset({LAYERS[mine][0], LAYERS[theirs][0]})
            if theirs > mine or (theirs != mine and pair in SIDE_BY_SIDE):
                wrong.append(f"{name} ({LAYERS[mine][0]}) imports {target} ({LAYERS[theirs][0]})")
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (cycle := visit(start)) is not None:
            return cycle
    return None


def test_no_import_cycles() -> None:
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_checks_catch_what_they_are_for(tmp_path: Path) -> None:
    # The checks themselves must be able to fail: a cycle and an upward import are found.
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert layer_of("condaproxy.conda.paths") < layer_of("condaproxy.cache.download")
    assert layer_of("condaproxy.errors") < layer_of("condaproxy.conda.paths")
    with pytest.raises(AssertionError, match="belongs to no layer"):
        layer_of("condaproxy.somewhere_new")
    fake = tmp_path / "condaproxy" / "conda" / "x.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("from condaproxy.cache import download\nimport condaproxy.http.live\n")
    known = {"condaproxy.cache.download", "condaproxy.http.live"}
    assert set(imports("condaproxy.conda.x", fake, known)) == known


def test_package_faces_say_what_they_hold() -> None:
    # Each subpackage's __init__ is its description: a docstring, and no code to re-export.
    for init in sorted(PACKAGE.glob("*/__init__.py")):
        tree = ast.parse(init.read_text())
        assert ast.get_docstring(tree), f"{init} has no docstring"
        assert len(tree.body) == 1, f"{init} holds code besides its docstring"
