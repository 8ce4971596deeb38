"""notebooks/apc_end_to_end.ipynb runs from the first cell to the last, with tiny settings."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "apc_end_to_end.ipynb"

# Runs the notebook in a Jupyter kernel, training both models.
pytestmark = pytest.mark.integration


def test_notebook_runs_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APC_NOTEBOOK_IMAGE_SIZE", "64")
    monkeypatch.setenv("APC_NOTEBOOK_FINETUNE_EPOCHS", "1")
    monkeypatch.setenv("APC_NOTEBOOK_BACKBONE", "resnet18")
    monkeypatch.setenv("APC_NOTEBOOK_WORK_DIR", str(tmp_path / "work"))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    markdown = "".join(output.get("data", {}).get("text/markdown", "") for output in outputs)
    assert "| APC | demo |" in markdown and "| Patchcore | demo |" in markdown
    assert sum("image/png" in output.get("data", {}) for output in outputs) >= 3
    assert (tmp_path / "work" / "benchmark" / "results.json").is_file()
