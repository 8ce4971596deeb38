"""``anomalib-apc benchmark --devices N``: APC fine-tunes with Lightning's DDP, rank 0 tests and reports.

The end-to-end test runs the benchmark on the tiny dataset with ``--devices 1`` and ``--devices 2``
(two CPU processes, gloo; Lightning re-runs ``python -m anomalib_apc.benchmark`` for rank 1). The rows
whose phase 1 is a no-op, Patchcore and ``APC tasks-none`` (no task, so no fine-tuning: the memory bank
is built on the initial weights, sharded across the ranks under DDP), must give the metrics of one
device on the whole test set; APC fine-tuned for one epoch on two ranks must finish with finite metrics.
Rank 1 must write nothing into the output folder: its engine folders go to a scratch folder, deleted at
the end, and only rank 0 writes and prints the report.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from anomalib_apc.benchmark.data import resolve_categories
from anomalib_apc.benchmark.engines import check_devices
from anomalib_apc.benchmark.metrics import METRIC_NAMES
from anomalib_apc.benchmark.settings import BenchmarkSettings
from anomalib_apc.data import make_demo_dataset
from anomalib_apc.errors import InvalidInputError, MissingInputError
from tests.conftest import TinyDataset

NO_OP_PHASE_1 = ("Patchcore", "APC tasks-none")


@pytest.mark.parametrize("devices", [0, -2])
def test_devices_below_one_are_refused_naming_the_option(devices: int) -> None:
    with pytest.raises(InvalidInputError, match="--devices"):
        BenchmarkSettings(devices=devices).resolved()


def test_devices_the_accelerator_cannot_give_are_refused_before_training() -> None:
    import torch

    if torch.cuda.device_count() >= 2:
        pytest.skip("two GPUs are there")
    with pytest.raises(InvalidInputError, match="--devices 2 on --device gpu"):
        check_devices(BenchmarkSettings(device="gpu", devices=2))


def test_other_ranks_read_the_demo_dataset_rank_0_wrote_and_never_write_it(tmp_path: Path) -> None:
    settings = BenchmarkSettings(output=tmp_path / "out").resolved()
    with pytest.raises(MissingInputError, match="demo dataset"):
        resolve_categories(settings, write_demo_dataset=False)  # not written yet: refused, nothing written
    assert not (tmp_path / "out").exists()
    make_demo_dataset(tmp_path / "out" / "demo_dataset", num_train=1, num_test_normal=1, num_per_defect_type=1)
    before = {path: path.stat().st_mtime_ns for path in (tmp_path / "out").rglob("*.png")}
    assert resolve_categories(settings, write_demo_dataset=False) == resolve_categories(settings)[:1]
    after_reading = {path: path.stat().st_mtime_ns for path in (tmp_path / "out").rglob("*.png")}
    assert len(before) == 8 and after_reading != before  # the second call (rank 0) rewrote them, the first did not
    resolve_categories(settings, write_demo_dataset=False)
    assert {path: path.stat().st_mtime_ns for path in (tmp_path / "out").rglob("*.png")} == after_reading


def _benchmark(dataset: TinyDataset, output: Path, devices: int) -> subprocess.CompletedProcess:
    scratch = output.parent / f"tmp{devices}"
    scratch.mkdir()
    command = [
        sys.executable, "-m", "anomalib_apc.benchmark",
        "--dataset", "mvtec-layout", "--root", str(dataset.category_dir),
        "--num-anomalies", "4", "--backbone", "resnet18", "--no-pretrained", "--image-size", "64",
        "--finetune-epochs", "1", "--variants", "tasks-none", "--batch-size", "4", "--eval-batch-size", "8",
        "--device", "cpu", "--devices", str(devices), "--output", str(output),
    ]
    environment = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TMPDIR": str(scratch)}
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert list(scratch.iterdir()) == [], "rank 1's scratch folder is left behind"
    return result


def _rows(output: Path) -> dict[str, dict]:
    return {run["model"]: run for run in json.loads((output / "results.json").read_text())["runs"]}


def _files(output: Path) -> list[str]:
    return sorted(str(path.relative_to(output)) for path in output.rglob("*"))


@pytest.mark.integration
def test_two_devices_give_the_one_device_metrics_where_phase_1_is_a_no_op(
    tiny_dataset: TinyDataset, tmp_path: Path
) -> None:
    _benchmark(tiny_dataset, tmp_path / "one", devices=1)
    result = _benchmark(tiny_dataset, tmp_path / "two", devices=2)
    one, two = _rows(tmp_path / "one"), _rows(tmp_path / "two")

    assert list(two) == ["Patchcore", "APC", "APC tasks-none"] and not any(run["error"] for run in two.values())
    full_test_set = tiny_dataset.test_normal + tiny_dataset.test_anomalous - 4
    assert {run["num_test_images"] for run in two.values()} == {full_test_set}  # every image once, in rank 0
    for model in NO_OP_PHASE_1:
        assert two[model]["metrics"] == pytest.approx(one[model]["metrics"], abs=1e-6), model
        assert (two[model]["memory_bank_rows"], two[model]["memory_bank_dim"]) == (
            one[model]["memory_bank_rows"], one[model]["memory_bank_dim"])
    assert two["APC tasks-none"]["metrics"] == pytest.approx(two["Patchcore"]["metrics"], abs=1e-6)
    assert all(math.isfinite(two["APC"]["metrics"][name]) for name in METRIC_NAMES)
    assert math.isfinite(two["APC"]["finetune_s"])

    assert result.stdout.count("Results: ") == 1  # rank 1 neither writes nor prints the report
    assert _files(tmp_path / "two") == _files(tmp_path / "one")  # nor any run folder of its own
    report = (tmp_path / "two" / "results.md").read_text()
    assert "the APC rows fine-tuned on 2 devices (Lightning DDP), every model tested on one" in report
    assert json.loads((tmp_path / "two" / "results.json").read_text())["settings"]["devices"] == 2
