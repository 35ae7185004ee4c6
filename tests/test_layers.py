"""Layers point one way: every ``slidessl`` module imports only from its own layer or the
layers below it - function-level imports included, relative imports resolved.

Order, bottom to top: the package-level helpers (``slidessl.atomic``, ``slidessl.progress``,
``slidessl.cpus``, ``slidessl.dtensor``), then ``data``, ``models``, ``ssl``, ``train``,
``eval``, ``bench`` (the benchmark harness and its ``slidessl bench`` command: above
everything it times, below the command line), and last ``cli`` (``slidessl.cli`` and
``python -m slidessl``). The package root ``slidessl`` holds ``__version__`` and re-exports
``models.io.load_encoder``: it sits with ``models``.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "slidessl"

HELPERS = ("atomic", "progress", "cpus", "dtensor")
LAYERS = ("helpers", "data", "models", "ssl", "train", "eval", "bench", "cli")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (SRC / rel).with_suffix(".py").is_file() or (SRC / rel / "__init__.py").is_file()


def layer(name: str) -> int:
    """The layer of a ``slidessl`` module (its rank in ``LAYERS``)."""
    parts = name.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    if top in HELPERS:
        return LAYERS.index("helpers")
    if top in LAYERS:
        return LAYERS.index(top)
    if top == "__init__":  # the package root re-exports models.io.load_encoder, nothing else
        return LAYERS.index("models")
    if top in ("__main__", "cli"):
        return LAYERS.index("cli")
    raise AssertionError(f"{name}: no layer for slidessl.{top}; add it to LAYERS")


def _imports(text: str, name: str, is_package: bool = False):
    """``(line, imported module)`` for every import in the source ``text`` of module
    ``name``, at any depth (function bodies too), relative imports resolved."""
    package = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                yield node.lineno, full if _is_module(full) else base


def upward_imports() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module_name(path)
        own = layer(name)
        for line, target in _imports(path.read_text(), name, path.name == "__init__.py"):
            if target.split(".")[0] != "slidessl":
                continue
            if layer(target) > own:
                found.append(
                    f"{name} ({LAYERS[own]}) imports {target} ({LAYERS[layer(target)]}) "
                    f"at {path.relative_to(SRC)}:{line}"
                )
    return found


def test_every_module_has_a_layer():
    for path in PACKAGE.rglob("*.py"):
        layer(_module_name(path))


def test_no_module_imports_a_layer_above_it():
    found = upward_imports()
    assert not found, "upward imports:\n" + "\n".join(found)


def test_the_walk_sees_function_level_and_relative_imports():
    """The checker itself: a function-level import and a relative one are both found."""
    text = "def f():\n    from ..train import step\n    import slidessl.eval.probe\n"
    found = [target for _, target in _imports(text, "slidessl.ssl.meta")]
    assert found == ["slidessl.train.step", "slidessl.eval.probe"]
