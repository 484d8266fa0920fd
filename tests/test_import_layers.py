"""Imports flow one way: a module of micromae imports only from its own layer or lower ones, and no private
name (``_x``) crosses from one module to another.

Every module under ``src/micromae`` is parsed with ``ast``: module-level and function-local imports, absolute
and relative. The layer order is written once, here, lowest first.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import micromae

# lowest first; a name stands for the module and everything below it (``micromae.cli_`` for every cli_*.py)
LAYERS: tuple[tuple[str, ...], ...] = (
    ("micromae", "micromae.errors"),
    ("micromae.runtime", "micromae.config", "micromae.config_tasks", "micromae.architectures"),
    ("micromae.io",),
    ("micromae.figures",),
    ("micromae.data",),
    ("micromae.models",),
    ("micromae.train",),
    ("micromae.segment",),
    ("micromae.evaluate",),
    # the CLI, the demo, and the plugin and export packages, which use every layer below
    ("micromae.cli", "micromae.cli_", "micromae.demo", "micromae.__main__", "micromae.napari", "micromae.export"),
)

PACKAGE_ROOT = Path(micromae.__file__).parent


def layer_of(module: str) -> int:
    """Index in :data:`LAYERS` of a dotted module name of micromae (the longest matching entry wins)."""
    best, best_len = None, -1
    for i, names in enumerate(LAYERS):
        for name in names:
            hit = module == name or module.startswith(name + ".") or (name.endswith("_") and module.startswith(name))
            if hit and len(name) > best_len:
                best, best_len = i, len(name)
    if best is None:
        raise AssertionError(f"module {module} has no layer: add it to LAYERS in {__file__}")
    return best


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE_ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_module(dotted: str) -> bool:
    rel = Path(*dotted.split(".")[1:]) if "." in dotted else Path()
    base = PACKAGE_ROOT / rel
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def imports_of(path: Path) -> list[tuple[int, str, str]]:
    """``(line, target module, imported name)`` for every import of a micromae module in ``path``."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, a.name) for a in node.names if a.name.split(".")[0] == "micromae"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "micromae":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                # `from micromae import cli_segment`: the target is the submodule
                found.append((node.lineno, sub if is_module(sub) else target, alias.name))
    return found


def violations() -> tuple[list[str], list[str]]:
    upward, private = [], []
    for path in sorted(PACKAGE_ROOT.rglob("*.py")):
        name = module_name(path)
        own = layer_of(name)
        for line, target, imported in imports_of(path):
            where = f"{path.relative_to(PACKAGE_ROOT.parent)}:{line}"
            if layer_of(target) > own:
                upward.append(f"{where}: {name} (layer {own + 1}) imports {imported} from {target} "
                              f"(layer {layer_of(target) + 1})")
            if imported.startswith("_") and not imported.startswith("__") and target != name:
                private.append(f"{where}: {name} imports the private name {imported} from {target}")
    return upward, private


def test_layers_cover_every_module():
    for path in PACKAGE_ROOT.rglob("*.py"):
        layer_of(module_name(path))


def test_relative_and_local_imports_are_seen(tmp_path):
    assert layer_of("micromae.cli_segment") == layer_of("micromae.cli") == len(LAYERS) - 1
    assert layer_of("micromae.train.log") == 6 and layer_of("micromae.errors") == 0
    assert layer_of("micromae.napari.widgets") == layer_of("micromae.export.bioimageio") == len(LAYERS) - 1
    found = imports_of(PACKAGE_ROOT / "cli.py")
    assert any(target == "micromae.cli_segment" for _, target, _ in found)
    assert any(target.startswith("micromae.segment") for _, target, _ in imports_of(PACKAGE_ROOT / "cli_segment.py"))


def test_no_import_against_the_flow():
    upward, _ = violations()
    if upward:
        pytest.fail("imports from a higher layer:\n" + "\n".join(upward))


def test_no_private_name_crosses_modules():
    _, private = violations()
    if private:
        pytest.fail("private names imported from another module:\n" + "\n".join(private))
