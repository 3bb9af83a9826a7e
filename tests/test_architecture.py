"""The tree's layering, read from the source (AST, lazy imports inside functions included).

1. ``activation_transfer/``: the library, plain torch/HF/numpy code; imports nothing else of the project and
   nothing of Lightning.
2. ``datamodules/`` and ``callbacks/``: Lightning glue; import only the library (and their own package).
3. ``lightning_modules/``: only LightningModules; import anything below.
4. ``cli/``: the CLIs, organism training and the demos; import anything below.
5. Entry points (``train.py``, ``evaluate.py``, ``report.py``, ``organism.py``): import anything.

No import cycle among the project's modules, and no file grows past the size a reader can hold.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("activation_transfer", "datamodules", "callbacks", "lightning_modules", "cli")
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
    top = module.split(".")[0]
    if top == "activation_transfer":
        return "library"
    if top in ("datamodules", "callbacks", "cli"):
        return top
    if top == "lightning_modules":
        return "modules"
    return "entry"


# What each layer may import (its own layer is always allowed; cycles are checked separately).
ALLOWED = {
    "library": {"library"},
    "datamodules": {"library", "datamodules"},
    "callbacks": {"library", "callbacks"},
    "modules": {"library", "datamodules", "callbacks", "modules"},
    "cli": {"library", "datamodules", "callbacks", "modules", "cli"},
    "entry": {"library", "datamodules", "callbacks", "modules", "cli"},
}
# The library runs without Lightning (a notebook, the torch-free report, another trainer can use it).
LIGHTNING = ("pytorch_lightning", "lightning", "jsonargparse", "torchmetrics")


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
    assert layer("activation_transfer.models.hooks") == "library"
    assert "modules" not in ALLOWED[layer("datamodules.activation_store")]
    assert "cli" not in ALLOWED[layer("lightning_modules.translator")]


def test_lazy_imports_are_seen(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from datamodules.corpora import load_corpus\n")
    assert imports_of(src, project_modules()) == {"datamodules.corpora"}


@pytest.mark.parametrize("path", sorted(project_modules().values()), ids=lambda p: str(p.relative_to(ROOT)))
def test_module_size(path):
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(ROOT)} has {n} lines (> {MAX_LINES}): split it by idea"


def third_party_imports(path: Path) -> set[str]:
    """Top-level names of every module ``path`` imports (lazy imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def test_library_imports_nothing_of_lightning():
    bad = [
        f"{name}: {sorted(third_party_imports(path) & set(LIGHTNING))}"
        for name, path in project_modules().items()
        if layer(name) == "library" and third_party_imports(path) & set(LIGHTNING)
    ]
    assert not bad, "the library imports Lightning:\n" + "\n".join(bad)


def _defines_lightning_module(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ClassDef):
            for base in node.bases:
                if (isinstance(base, ast.Attribute) and base.attr == "LightningModule") or (
                    isinstance(base, ast.Name) and base.id == "LightningModule"
                ):
                    return True
    return False


@pytest.mark.parametrize(
    "path",
    sorted(p for p in (ROOT / "lightning_modules").glob("*.py") if p.name != "__init__.py"),
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_lightning_modules_holds_only_lightning_modules(path):
    assert _defines_lightning_module(path), f"{path.relative_to(ROOT)} defines no LightningModule: move it to cli/"


def test_test_folders_do_not_shadow_the_packages_they_mirror():
    # tests/<package>/ has no __init__.py, so it is at most a namespace portion; the real package must win.
    import importlib

    for pkg in PACKAGES:
        module = importlib.import_module(pkg)
        assert Path(module.__file__).resolve().parent == ROOT / pkg, f"{pkg} resolves to {module.__file__}"
