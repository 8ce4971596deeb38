"""Imports point down only: cli -> benchmark, deploy -> models, data -> sampling, named_weights -> contracts, errors.

Read from the source with ``ast`` (imports inside functions count too), so a new upward or sideways
import fails here rather than in a reader's head.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "anomalib_apc"

LAYERS = {
    "cli": 4,
    "benchmark": 3,
    "deploy": 3,
    "models": 2,
    "data": 2,
    "sampling": 1,
    "named_weights": 1,
    "contracts": 0,
    "errors": 0,
}
"""Each part of the package and its height: a module may import parts strictly below its own, and its own part."""
OUTSIDE_THE_LAYERS = {"_autoload", "__init__"}
"""The start-up hook that registers the short names with anomalib, and the package face: they import on purpose."""


def _part(module: str) -> str | None:
    """``anomalib_apc.models.apc.encoder`` -> ``models``; ``None`` outside the package."""
    names = module.split(".")
    return names[1] if names[0] == "anomalib_apc" and len(names) > 1 else None


def _imports(path: Path) -> set[str]:
    package = ".".join(("anomalib_apc", *path.relative_to(PACKAGE).with_suffix("").parts[:-1]))
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            found.add(f"{base}.{node.module}" if base and node.module else base or node.module or "")
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda path: str(path.relative_to(PACKAGE)))
def test_every_import_points_down(path: Path) -> None:
    own = path.relative_to(PACKAGE).with_suffix("").parts[0]
    if own in OUTSIDE_THE_LAYERS:
        return
    assert own in LAYERS, f"{own} has no place in LAYERS: give it one"
    upward = [
        module
        for module in _imports(path)
        if (part := _part(module)) is not None and part != own and LAYERS.get(part, 99) >= LAYERS[own]
    ]
    assert not upward, f"{path.relative_to(PACKAGE)} imports {upward}, which is not below {own}"


def test_the_check_sees_relative_and_function_level_imports() -> None:
    lightning_model = PACKAGE / "models" / "apc" / "lightning_model.py"
    imports = _imports(lightning_model)
    assert "anomalib_apc.models.apc.normal_images" in imports  # from .normal_images import ...
    assert "anomalib_apc.contracts" in _imports(PACKAGE / "models" / "apc" / "normal_images.py")
    assert "anomalib_apc.named_weights" in _imports(PACKAGE / "cli.py")  # imported inside a function
