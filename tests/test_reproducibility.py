"""`anomalib train --config` with a seed is bit-identical between runs; the Python API stays deterministic.

anomalib 2.7's CLI parses ``seed_everything`` but never applies it, so the model seeds its own initial
weights (``seed``, default 0). Two CLI runs in fresh processes must give the same checkpoint, tensor
for tensor (memory bank, fine-tuned weights, thresholds): the test metrics follow from those.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from anomalib_apc.models import AnomalousPatchCore

IMAGE_SIZE = 64
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _config(dataset_root: Path, category: str, run_dir: Path) -> dict:
    """A config as users write them: ``seed_everything`` and the seeds of the data, no model ``seed`` (default 0)."""
    pre_processor = {
        "class_path": "anomalib.pre_processing.PreProcessor",
        "init_args": {"transform": {"class_path": "torchvision.transforms.v2.Compose", "init_args": {"transforms": [
            {"class_path": "torchvision.transforms.v2.Resize", "init_args": {"size": [IMAGE_SIZE, IMAGE_SIZE]}},
            {"class_path": "torchvision.transforms.v2.Normalize",
             "init_args": {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}},
        ]}}},
    }
    return {
        "seed_everything": 0,
        "model": {"class_path": "anomalib_apc.models.AnomalousPatchCore", "init_args": {
            "backbone": "resnet18", "pre_trained": False, "finetune_epochs": 1, "learning_rate": 1e-3,
            "coreset_sampling_ratio": 0.5, "pre_processor": pre_processor, "visualizer": False,
        }},
        "data": {"class_path": "anomalib_apc.data.SupervisedMVTecAD", "init_args": {
            "root": str(dataset_root), "category": category, "num_anomalies": 3, "train_batch_size": 8,
            "eval_batch_size": 32, "num_workers": 0, "seed": 0,
        }},
        "default_root_dir": str(run_dir),
        "trainer": {"accelerator": "cpu", "logger": False, "enable_progress_bar": False},
    }


def _train_twice_with_anomalib_cli(tmp_path: Path, tiny_dataset) -> list[dict]:
    """Two ``anomalib train`` runs of the same config in fresh processes, side by side to halve the wait."""
    runs = []
    for name in ("first", "second"):
        config = tmp_path / f"{name}.yaml"
        config.write_text(yaml.safe_dump(_config(tiny_dataset.root, tiny_dataset.category, tmp_path / name)))
        command = [sys.executable, "-c", "from anomalib.cli.cli import main; main()", "train", "--config", str(config)]
        with (tmp_path / f"{name}.log").open("w") as log:
            runs.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT))
    state_dicts = []
    for name, run in zip(("first", "second"), runs, strict=True):
        assert run.wait(timeout=300) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
        [checkpoint] = (tmp_path / name).rglob("*.ckpt")
        state_dicts.append(torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"])
    return state_dicts


def _assert_identical(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    different = [key for key in first if not torch.equal(first[key], second[key])]
    assert not different, different[:5]


@pytest.mark.integration
def test_anomalib_cli_runs_with_a_seed_are_bit_identical(tmp_path: Path, tiny_dataset) -> None:
    first, second = _train_twice_with_anomalib_cli(tmp_path, tiny_dataset)
    assert first["model.memory_bank"].shape[0] > 0
    _assert_identical(first, second)


def test_initial_weights_follow_the_seed_not_the_global_random_state() -> None:
    torch.manual_seed(123)
    first = AnomalousPatchCore(backbone="resnet18", pre_trained=False, seed=0).model.state_dict()
    state = torch.random.get_rng_state()
    second = AnomalousPatchCore(backbone="resnet18", pre_trained=False, seed=0).model.state_dict()
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random stream is left alone
    _assert_identical(first, second)
    other = AnomalousPatchCore(backbone="resnet18", pre_trained=False, seed=1).model.state_dict()
    assert not torch.equal(first["feature_extractor.model.conv1.weight"], other["feature_extractor.model.conv1.weight"])


def test_without_a_seed_the_global_generators_decide() -> None:
    torch.manual_seed(5)
    first = AnomalousPatchCore(backbone="resnet18", pre_trained=False, seed=None).model.state_dict()
    torch.manual_seed(5)
    second = AnomalousPatchCore(backbone="resnet18", pre_trained=False, seed=None).model.state_dict()
    _assert_identical(first, second)
    third = AnomalousPatchCore(backbone="resnet18", pre_trained=False, seed=None).model.state_dict()
    assert not torch.equal(first["feature_extractor.model.conv1.weight"], third["feature_extractor.model.conv1.weight"])
