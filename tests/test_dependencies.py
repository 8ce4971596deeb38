"""Every third-party package the code imports is a declared dependency, and a declared one is imported.

A package that only arrives because anomalib happens to need it today (pyyaml, pandas, ...) breaks
the day anomalib drops it; one declared but never imported (onnx) is installed for nothing. Packages
imported only inside a function that a user opts into (nncf for INT8) belong to an extra.
"""

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import tomllib

REPOSITORY = Path(__file__).resolve().parents[1]
PACKAGE = REPOSITORY / "anomalib_apc"


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _imported_distributions() -> dict[str, set[str]]:
    """Distribution name -> the project files importing it (any depth of the file: lazy imports too)."""
    distributions = importlib.metadata.packages_distributions()
    found: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top in sys.stdlib_module_names or top == "anomalib_apc" or top == "msvcrt":
                    continue
                for distribution in distributions.get(top, [top]):
                    found.setdefault(_name(distribution), set()).add(str(path.relative_to(REPOSITORY)))
    return found


def test_every_imported_package_is_declared_and_every_declared_one_imported() -> None:
    project = tomllib.loads((REPOSITORY / "pyproject.toml").read_text())["project"]
    required = {_name(requirement) for requirement in project["dependencies"]}
    extras = {_name(requirement) for requirement in project["optional-dependencies"]["quantization"]}
    imported = _imported_distributions()
    undeclared = {name: sorted(files) for name, files in imported.items() if name not in required | extras}
    assert not undeclared, f"imported but not declared: {undeclared}"
    assert not required - set(imported), f"declared but never imported: {sorted(required - set(imported))}"
    onnx_extra = {_name(requirement) for requirement in project["optional-dependencies"]["onnx"]}
    assert onnx_extra == {"onnx", "onnxscript"} and not onnx_extra & required


def test_the_package_imports_without_posix_only_modules() -> None:
    """Windows has no ``resource`` module; anomalib runs there, so importing the models must not need it."""
    import subprocess

    code = ("import sys; sys.modules['resource'] = None\n"
            "import anomalib_apc.models, anomalib_apc.deploy, anomalib_apc.benchmark, torch\n"
            "from anomalib_apc.models.apc.distributed import peak_memory_mib\n"
            "print(peak_memory_mib(torch.device('cpu')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "nan"
