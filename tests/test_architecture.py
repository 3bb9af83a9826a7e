"""The tree's layering, read from the source (AST, lazy imports inside functions included).

1. ``lightning_modules/components/``: plain torch/HF/numpy code; imports nothing else of the project.
2. ``datamodules/`` and ``callbacks/``: Lightning glue; import only components (and their own package).
3. ``lightning_modules/*.py``: LightningModules, CLIs, organisms, demo; import anything below.
4. Entry points (``train.py``, ``evaluate.py``, ``report.py``, ``organism.py``): import anything.

No import cycle among the project's modules, and no file grows past the size a reader can hold.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lightning_modules", "datamodules", "callbacks")
ENTRY_POINTS = ("train.py", "evaluate.py", "report.py", "organism.py")
MAX_LINES = 400


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")] + [ROOT / e for e in ENTRY_POINTS]
    return {_module_name(p): p for p in files}


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules that ``path`` imports anywhere in its body (``from a import b`` counts ``a.b`` if a module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            # The longest project module that the dotted name starts with.
            parts = name.split(".")
            for i in range(len(parts), 0, -1):
                candidate = ".".join(parts[:i])
                if candidate in modules:
                    found.add(candidate)
                    break
    if path.is_relative_to(ROOT):
        found.discard(_module_name(path))
    return found


def layer(module: str) -> str:
    if module.startswith("lightning_modules.components"):
        return "components"
    if module.startswith(("datamodules", "callbacks")):
        return module.split(".")[0]
    if module.startswith("lightning_modules"):
        return "modules"
    return "entry"


# What each layer may import (its own layer is always allowed; cycles are checked separately).
ALLOWED = {
    "components": {"components"},
    "datamodules": {"components", "datamodules"},
    "callbacks": {"components", "callbacks"},
    "modules": {"components", "datamodules", "callbacks", "modules"},
    "entry": {"components", "datamodules", "callbacks", "modules"},
}


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(path, modules) for name, path in modules.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path ``[a, b, ..., a]``, or None (iterative DFS with colours)."""
    white, grey, black = 0, 1, 2
    colour = dict.fromkeys(edges, white)
    for start in sorted(edges):
        if colour[start] != white:
            continue
        stack = [(start, iter(sorted(edges[start])))]
        path = [start]
        colour[start] = grey
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                colour[node] = black
                stack.pop()
                path.pop()
            elif colour.get(child, black) == grey:
                return path[path.index(child) :] + [child]
            elif colour.get(child) == white:
                colour[child] = grey
                stack.append((child, iter(sorted(edges[child]))))
                path.append(child)
    return None


def test_no_import_cycle():
    assert find_cycle(graph()) is None, f"import cycle: {' -> '.join(find_cycle(graph()))}"


def test_layers_import_only_downward():
    bad = [
        f"{src} ({layer(src)}) imports {dst} ({layer(dst)})"
        for src, targets in graph().items()
        for dst in sorted(targets)
        if layer(dst) not in ALLOWED[layer(src)]
    ]
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_checker_catches_cycles_and_upward_imports():
    # The checks above can fail: a cycle and an upward edge are found in a made-up graph.
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a"}}) is None
    assert layer("lightning_modules.components.hooks") == "components"
    assert "modules" not in ALLOWED[layer("datamodules.activation_store")]


def test_lazy_imports_are_seen(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from datamodules.corpora import load_corpus\n")
    assert imports_of(src, project_modules()) == {"datamodules.corpora"}


@pytest.mark.parametrize("path", sorted(project_modules().values()), ids=lambda p: str(p.relative_to(ROOT)))
def test_module_size(path):
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(ROOT)} has {n} lines (> {MAX_LINES}): split it by idea"
