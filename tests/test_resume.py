"""A fine-tuning run killed with SIGKILL resumes from its last fine-tuning checkpoint to the same model.

``anomalib train --config`` runs in fresh processes: one uninterrupted, one killed (SIGKILL from this
process, as an out-of-memory killer or a preemption would) once a fine-tuning checkpoint exists, then
``anomalib train --ckpt_path`` on that checkpoint. The resumed run's final checkpoint must equal the
uninterrupted run's, tensor for tensor (fine-tuned weights, memory bank, thresholds and normalisation
statistics, from which every score follows). The fine-tuning checkpoint itself is not deployable.
"""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from test_reproducibility import _assert_identical, _config

from anomalib_apc.deploy import export_bundle
from anomalib_apc.errors import InvalidInputError
from anomalib_apc.models import AnomalousPatchCore

EPOCHS = 6


def _anomalib_train(tmp_path: Path, tiny_dataset, name: str, *extra: str) -> tuple[subprocess.Popen, Path]:
    config = _config(tiny_dataset.root, tiny_dataset.category, tmp_path / name)
    config["model"]["init_args"] |= {"finetune_epochs": EPOCHS, "checkpoint_every_n_epochs": 1}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-c", "from anomalib.cli.cli import main; main()", "train", "--config", str(path),
               *extra]
    log = (tmp_path / f"{name}.log").open("w")
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT), tmp_path / f"{name}.log"


def _final_state(run_dir: Path) -> dict:
    [checkpoint] = run_dir.rglob("model.ckpt")
    return torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]


def _kill_after_a_finetuning_checkpoint(process: subprocess.Popen, run_dir: Path, log: Path) -> Path:
    deadline = time.monotonic() + 300
    while not list(run_dir.rglob("finetuning-epoch=2.ckpt")):
        assert process.poll() is None, f"the run ended before it could be killed:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "no fine-tuning checkpoint in 300 s"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL
    assert not list(run_dir.rglob("model.ckpt"))  # killed during phase 1
    [checkpoint] = run_dir.rglob("finetuning-epoch=*.ckpt")  # only the newest is kept
    return checkpoint


@pytest.mark.integration
def test_a_killed_finetuning_resumes_to_the_uninterrupted_model(tmp_path: Path, tiny_dataset) -> None:
    full, full_log = _anomalib_train(tmp_path, tiny_dataset, "full")
    assert full.wait(timeout=600) == 0, full_log.read_text()[-3000:]
    killed, killed_log = _anomalib_train(tmp_path, tiny_dataset, "killed")
    checkpoint = _kill_after_a_finetuning_checkpoint(killed, tmp_path / "killed", killed_log)
    epochs_done = int(checkpoint.stem.removeprefix("finetuning-epoch="))
    assert 2 <= epochs_done < EPOCHS

    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert not bool(saved["state_dict"]["_is_fitted"]) and saved["state_dict"]["model.memory_bank"].numel() == 0
    assert saved["epoch"] == epochs_done - 1 and saved["optimizer_states"]
    with pytest.raises(InvalidInputError, match="a fine-tuning checkpoint, taken before the memory bank was built"):
        export_bundle(checkpoint, tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()

    resumed, resumed_log = _anomalib_train(tmp_path, tiny_dataset, "resumed", "--ckpt_path", str(checkpoint))
    assert resumed.wait(timeout=600) == 0, resumed_log.read_text()[-3000:]
    assert f"Restored all states from the checkpoint at {checkpoint}" in resumed_log.read_text()
    final, resumed_state = _final_state(tmp_path / "full"), _final_state(tmp_path / "resumed")
    assert final["model.memory_bank"].shape[0] > 0
    _assert_identical(final, resumed_state)
    # ... and the resumed run fine-tuned: its weights are not those of the checkpoint it started from.
    name = "model.feature_extractor.model.conv1.weight"
    assert not torch.equal(resumed_state[name], saved["state_dict"][name])


def test_testing_a_model_without_a_memory_bank_is_refused_naming_the_fix(tiny_dataset, tmp_path: Path) -> None:
    from anomalib.engine import Engine

    from anomalib_apc.data import SupervisedMVTecAD

    model = AnomalousPatchCore(backbone="resnet18", pre_trained=False, visualizer=False)
    datamodule = SupervisedMVTecAD(root=tiny_dataset.root, category=tiny_dataset.category, num_anomalies=3,
                                   num_workers=0)
    engine = Engine(default_root_dir=tmp_path, logger=False, accelerator="cpu", enable_progress_bar=False)
    with pytest.raises(InvalidInputError, match=r"no memory bank yet.*--ckpt_path FILE"):
        engine.test(model=model, datamodule=datamodule)
    with pytest.raises(InvalidInputError, match="checkpoint_every_n_epochs must be >= 0"):
        AnomalousPatchCore(backbone="resnet18", pre_trained=False, checkpoint_every_n_epochs=-1)
