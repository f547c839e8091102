"""The package's import graph: wings import only downward, and nothing imports in a circle.

Every `import` / `from ... import` in every module (at module level or inside functions) is parsed with
`ast` and resolved to the package modules it names."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "optimalsteps"

# the wing of a module -> the wings it may import (itself included)
MAY_IMPORT = {
    "core": {"core"},
    "testbeds": {"core", "testbeds"},
    "optimize": {"core", "optimize"},
    "evaluation": {"core", "testbeds", "optimize", "evaluation"},
    "integrations": {"core", "testbeds", "optimize", "evaluation", "integrations"},
    "cli": {"core", "testbeds", "optimize", "evaluation", "integrations", "cli"},
}
TOP = "top"  # the package's own front modules (optimalsteps, __main__, the diffusers alias): import anything


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(node: ast.ImportFrom, name: str, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = name.split(".") if is_package else name.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules `name` imports, anywhere in its file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(node, name, path.name == "__init__.py")
            # `from . import x` names a submodule x when there is one
            targets = [f"{target}.{a.name}" if f"{target}.{a.name}" in known else target for a in node.names]
        else:
            continue
        for target in targets:
            if target == "optimalsteps" or target.startswith("optimalsteps."):
                # a dotted name refers to its deepest package module
                while target not in known and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target in known and target != name:
                    found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(name, path, known) for name, path in mods.items()}


def wing(name: str) -> str:
    parts = name.split(".")
    if len(parts) > 1 and parts[1] in MAY_IMPORT:
        return parts[1]
    return TOP


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
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
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_every_module_is_seen():
    names = set(modules())
    assert {"optimalsteps.core.models", "optimalsteps.optimize.search", "optimalsteps.cli"} <= names


def test_wings_import_only_downward():
    wrong = []
    for name, targets in graph().items():
        own = wing(name)
        for target in targets:
            other = wing(target)
            if own != TOP and (other == TOP or other not in MAY_IMPORT[own]):
                wrong.append(f"{name} ({own}) imports {target} ({other})")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycles():
    found = cycles(graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_the_checks_catch_a_cycle_and_an_upward_import():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert wing("optimalsteps.core.models") == "core" and "optimize" not in MAY_IMPORT["core"]
