"""The package's layers (docs/architecture.md): a module imports only from its own layer or the layers below.

Every ``import`` is checked, including those inside functions. Layers, lowest first: ``core``, ``models``,
``data``, ``inference``, ``eval``, ``config``, ``training``, ``studies``; above them the command-line modules
(``pbbjax/<command>.py``, ``pbbjax/data/__main__.py``) and the package's public API (``pbbjax/__init__.py``).
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "pbbjax"
LAYERS = ["core", "models", "data", "inference", "eval", "config", "training", "studies"]
TOP = len(LAYERS)  # command lines and the public API


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str, path: Path | None = None) -> int:
    parts = module.split(".")
    if path is not None and path.name == "__main__.py":
        return TOP
    if len(parts) == 1 or parts[1] not in LAYERS:  # pbbjax itself, or a top-level command module
        return TOP
    return LAYERS.index(parts[1])


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every pbbjax module ``path`` imports; ``from pkg import name`` counts as
    ``pkg.name`` where that is a module."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "pbbjax"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "pbbjax":
            for a in node.names:
                full = f"{node.module}.{a.name}"
                file = PACKAGE.parent / full.replace(".", "/")
                out.append(
                    (node.lineno, full if file.with_suffix(".py").is_file() or file.is_dir() else node.module)
                )
    return out


SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "sandbox_child.py")


def test_every_library_module_sits_in_a_layer():
    strays = [
        str(p.relative_to(PACKAGE))
        for p in SOURCES
        if p.parent != PACKAGE and p.relative_to(PACKAGE).parts[0] not in LAYERS
    ]
    assert not strays, f"modules outside the layers {LAYERS}: {strays}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_from_a_layer_above_its_own(path):
    own = layer_of(module_name(path), path)
    upward = [
        f"line {line}: {module} ({LAYERS[layer_of(module)] if layer_of(module) < TOP else 'command/API'})"
        for line, module in imported_modules(path)
        if layer_of(module) > own
    ]
    where = LAYERS[own] if own < TOP else "command/API"
    assert not upward, f"{path.relative_to(PACKAGE)} ({where}) imports upward: {upward}"


def test_the_check_catches_an_upward_import(tmp_path):
    """The checker itself: a models module importing the trainer is flagged."""
    fake = PACKAGE / "models" / "decoder.py"
    imports = imported_modules(fake)
    assert all(layer_of(m) <= layer_of(module_name(fake)) for _, m in imports)
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from pbbjax.training import sft\n")
    assert [layer_of(m) for _, m in imported_modules(bad)] == [LAYERS.index("training")]
    assert layer_of("pbbjax") == TOP and layer_of("pbbjax.train") == TOP
