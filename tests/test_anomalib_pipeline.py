"""``anomalib benchmark --config configs/benchmark/apc_vs_patchcore.yaml`` runs both models through anomalib's grid.

A tiny copy of the shipped config (same structure; resnet18 from random weights, no resizing of the
64 px tiny dataset, coreset ratio 1.0) runs in a subprocess. anomalib's pipeline logs a failing job to
``runs/pipeline.log`` and still exits 0, so the test reads the results table it writes and shows the log
when a row is missing. The Patchcore row must equal anomalib's Patchcore on anomalib's own one-class
``MVTecAD`` over the same images (the moved anomalies deleted from a copy of the test set): on the
supervised datamodule it is served the normal training images only. With coreset ratio 1.0 the memory
bank holds every normal patch, whatever order the two datamodules read the images in. torch seeds its
generator randomly in every process and anomalib's pipeline builds each model before it seeds, so both
runs seed torch first (``PIPELINE``): both then build Patchcore first, from the same random weights.
"""

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from anomalib_apc.data import SupervisedMVTecAD
from tests.conftest import TinyDataset

SHIPPED = Path(__file__).resolve().parents[1] / "configs" / "benchmark" / "apc_vs_patchcore.yaml"
METRICS = ("image_AUROC", "image_F1Score", "pixel_AUROC", "pixel_F1Score")
NUM_ANOMALIES = 4
TINY_DATA = {"num_anomalies": NUM_ANOMALIES, "train_batch_size": 32, "eval_batch_size": 32, "num_workers": 0}
TINY_MODEL = {"backbone": "resnet18", "pre_trained": False, "coreset_sampling_ratio": 1.0, "pre_processor": False,
              "visualizer": False}

PIPELINE = "import torch; torch.manual_seed(0); from anomalib.cli.cli import main; main()"
"""``anomalib benchmark`` as its console script runs it, after seeding torch's generator."""

pytestmark = pytest.mark.integration


def _tiny_config(dataset: TinyDataset) -> dict:
    """The shipped config on the tiny dataset, on the CPU, with the tiny model settings."""
    config = yaml.safe_load(SHIPPED.read_text())
    config["accelerator"] = "cpu"
    config["benchmark"]["model"]["init_args"] |= TINY_MODEL
    data = config["benchmark"]["data"]["init_args"]
    data |= TINY_DATA | {"root": str(dataset.root), "category": {"grid": [dataset.category]}}
    return config


def _run_pipeline(config: dict, cwd: Path) -> pd.DataFrame:
    """``anomalib benchmark --config`` in ``cwd``; its results table, or a failure showing the pipeline's log."""
    cwd.mkdir()
    (cwd / "config.yaml").write_text(yaml.safe_dump(config))
    command = [sys.executable, "-c", PIPELINE, "benchmark", "--config", "config.yaml"]
    environment = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=600, check=False)
    tables = sorted((cwd / "runs" / "benchmark").glob("*/results.csv"))
    log = cwd / "runs" / "pipeline.log"
    details = (log.read_text()[-6000:] if log.exists() else "no runs/pipeline.log") + result.stderr[-3000:]
    assert result.returncode == 0 and len(tables) == 1, details
    table = pd.read_csv(tables[0])
    jobs = len(config["benchmark"]["model"]["class_path"]["grid"])
    assert len(table) == jobs and table[list(METRICS)].notna().all().all(), details
    return table


def _without_moved_anomalies(dataset: TinyDataset, destination: Path) -> Path:
    """A copy of the tiny dataset without the anomalies SupervisedMVTecAD moves to training (and their masks)."""
    datamodule = SupervisedMVTecAD(root=dataset.root, category=dataset.category, seed=0, **TINY_DATA)
    datamodule.setup()
    root = Path(shutil.copytree(dataset.root, destination))
    for path in map(Path, datamodule.supervised_anomaly_paths):
        relative = path.relative_to(dataset.category_dir)
        (root / dataset.category / relative).unlink()
        (root / dataset.category / "ground_truth" / relative.parent.name / f"{path.stem}_mask.png").unlink()
    return root


def test_the_shipped_grid_runs_patchcore_and_apc_through_anomalib_benchmark(
    tiny_dataset: TinyDataset, tmp_path: Path
) -> None:
    config = _tiny_config(tiny_dataset)
    table = _run_pipeline(config, tmp_path / "supervised")
    rows = table.set_index(["model.class_path", "data.init_args.category"])
    assert sorted(rows.index) == [("AnomalousPatchCore", tiny_dataset.category), ("Patchcore", tiny_dataset.category)]
    for model in ("Patchcore", "AnomalousPatchCore"):
        values = rows.loc[(model, tiny_dataset.category), list(METRICS)]
        assert all(0.0 <= value <= 1.0 and math.isfinite(value) for value in values), (model, values)

    reference = config | {"benchmark": {
        "seed": config["benchmark"]["seed"],
        "model": {"class_path": {"grid": ["Patchcore"]}, "init_args": config["benchmark"]["model"]["init_args"]},
        "data": {"class_path": "MVTecAD", "init_args": {
            "root": str(_without_moved_anomalies(tiny_dataset, tmp_path / "one_class_data")),
            "category": {"grid": [tiny_dataset.category]}, "seed": 0,
            **{key: TINY_DATA[key] for key in ("train_batch_size", "eval_batch_size", "num_workers")},
        }},
    }}
    [one_class] = _run_pipeline(reference, tmp_path / "one_class")[list(METRICS)].to_dict("records")
    patchcore = rows.loc[("Patchcore", tiny_dataset.category), list(METRICS)].to_dict()
    assert patchcore == pytest.approx(one_class, abs=1e-6)
