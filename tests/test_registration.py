"""anomalib's CLI knows the plugin's short names after `pip install`; other programs start as fast as before."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

# Every test starts a fresh Python process.
pytestmark = pytest.mark.integration


def _anomalib_cli(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", "from anomalib.cli.cli import main; main()", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO, check=False)


def test_short_names_resolve_in_a_fresh_process(tmp_path: Path) -> None:
    result = _anomalib_cli(
        "train", "--model", "AnomalousPatchCore", "--model.pre_trained", "false", "--model.backbone", "resnet18",
        "--data", "SupervisedMVTecAD", "--data.root", str(tmp_path), "--data.num_anomalies", "3", "--print_config",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    config = yaml.safe_load(result.stdout)
    assert config["model"]["class_path"] == "anomalib_apc.models.AnomalousPatchCore"
    assert config["model"]["init_args"]["backbone"] == "resnet18"
    assert config["data"]["class_path"] == "anomalib_apc.data.SupervisedMVTecAD"
    assert config["data"]["init_args"]["num_anomalies"] == 3


def test_full_class_paths_resolve_too(tmp_path: Path) -> None:
    result = _anomalib_cli(
        "train", "--model", "anomalib_apc.models.AnomalousPatchCore", "--data", "anomalib_apc.data.SupervisedFolder",
        "--data.name", "parts", "--data.root", str(tmp_path), "--data.normal_dir", "good", "--print_config",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert yaml.safe_load(result.stdout)["data"]["class_path"] == "anomalib_apc.data.SupervisedFolder"


def test_startup_of_programs_without_anomalib_imports_nothing_heavy() -> None:
    probe = "import sys; print(sorted(m for m in ('torch', 'anomalib', 'anomalib_apc.models') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
    hook = [sys.executable, "-c", "import sys; print([type(f).__name__ for f in sys.meta_path])"]
    assert "_AnomalibCliFinder" in subprocess.run(hook, capture_output=True, text=True, check=True).stdout
