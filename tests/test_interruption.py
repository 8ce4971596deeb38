"""SIGTERM / SIGINT in phase 1 or phase 2: non-zero exit, one line naming what stopped and what can be resumed.

Each case trains in its own process (``Engine.train``: fit, then test, as ``anomalib train`` does) and
the process signals itself at a fixed point: a callback at the first fine-tuning batch (phase 1), or
the datamodule after serving the first batch of normal images to the memory bank (phase 2).
"""

import subprocess
import sys
from pathlib import Path

import pytest

from anomalib_apc.errors import ApcError, InterruptedRunError
from anomalib_apc.models.apc.interruption import RunInterrupted

TRAIN_AND_SIGNAL = """
import os
import signal
import sys

from anomalib.engine import Engine
from lightning.pytorch import Callback

from anomalib_apc.data import SupervisedMVTecAD
from anomalib_apc.models import AnomalousPatchCore

root, category, output, signal_name, phase = sys.argv[1:]
signum = getattr(signal, signal_name)


class SignalAtFirstFineTuningBatch(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            os.kill(os.getpid(), signum)


class SignalDuringPhaseTwo(SupervisedMVTecAD):
    def normal_train_dataloader(self):
        for index, batch in enumerate(super().normal_train_dataloader()):
            yield batch
            if index == 0:
                os.kill(os.getpid(), signum)


datamodule_class = SignalDuringPhaseTwo if phase == "2" else SupervisedMVTecAD
datamodule = datamodule_class(root=root, category=category, num_anomalies=3, train_batch_size=4,
                              eval_batch_size=32, num_workers=0, seed=0)
model = AnomalousPatchCore(
    backbone="resnet18", pre_trained=False, finetune_epochs=2, checkpoint_every_n_epochs=1, coreset_sampling_ratio=0.5,
    visualizer=False,
    pre_processor=AnomalousPatchCore.configure_pre_processor(image_size=(64, 64)),
)
callbacks = [SignalAtFirstFineTuningBatch()] if phase == "1" else []
engine = Engine(default_root_dir=output, accelerator="cpu", logger=False, enable_progress_bar=False,
                callbacks=callbacks)
engine.train(model=model, datamodule=datamodule)
print("TRAINING RETURNED")
"""

SIGTERM_PHASE_1 = (
    "AnomalousPatchCore: SIGTERM interrupted phase 1 (fine-tuning, epoch 1 of 2); "
    "training did not finish and no checkpoint of this run is complete."
)
PHASE_2 = "phase 2 (building the memory bank from the normal training images)"
SIGTERM_PHASE_2 = (  # after the first of two epochs, whose fine-tuning checkpoint is there to resume from
    f"AnomalousPatchCore: SIGTERM interrupted {PHASE_2}; "
    "training did not finish; resume it from the fine-tuning checkpoint {checkpoint} (--ckpt_path)."
)
SIGINT_PHASE_2 = SIGTERM_PHASE_2.replace("SIGTERM", "SIGINT")
CASES = {"sigterm_phase1": ("SIGTERM", "1"), "sigterm_phase2": ("SIGTERM", "2"), "sigint_phase2": ("SIGINT", "2")}


@pytest.fixture(scope="module")
def interrupted_runs(tiny_dataset, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, str, Path]]:
    """Exit status, output and run folder of each case; the three processes run side by side."""
    root = tmp_path_factory.mktemp("interrupted")
    processes = {}
    for name, (signal_name, phase) in CASES.items():
        arguments = [str(tiny_dataset.root), tiny_dataset.category, str(root / name), signal_name, phase]
        with (root / f"{name}.log").open("w") as log:
            processes[name] = subprocess.Popen([sys.executable, "-c", TRAIN_AND_SIGNAL, *arguments], stdout=log,
                                               stderr=subprocess.STDOUT)
    return {name: (process.wait(timeout=300), (root / f"{name}.log").read_text(), root / name)
            for name, process in processes.items()}


def _assert_stopped_before_any_checkpoint(output: str, run_dir: Path, phase: str) -> str:
    """No final checkpoint, and a fine-tuning one only where an epoch was completed (phase 2); returns its path."""
    assert "TRAINING RETURNED" not in output
    assert "Test metric" not in output  # anomalib's test did not run on a half-built model
    checkpoints = list(run_dir.rglob("*.ckpt"))
    assert [path.name for path in checkpoints] == (["finetuning-epoch=1.ckpt"] if phase == "2" else [])
    return str(checkpoints[0]) if checkpoints else ""


@pytest.mark.integration
@pytest.mark.parametrize(("case", "line"), [("sigterm_phase1", SIGTERM_PHASE_1), ("sigterm_phase2", SIGTERM_PHASE_2)])
def test_sigterm_exits_with_one_line_and_no_checkpoint(interrupted_runs, case: str, line: str) -> None:
    status, output, run_dir = interrupted_runs[case]
    assert status == 1, output[-3000:]
    checkpoint = _assert_stopped_before_any_checkpoint(output, run_dir, CASES[case][1])
    assert output.rstrip().splitlines()[-1] == line.format(checkpoint=checkpoint)  # the line, no traceback after it
    assert "Traceback" not in output


@pytest.mark.integration
def test_sigint_in_phase_2_exits_non_zero_naming_it(interrupted_runs) -> None:
    status, output, run_dir = interrupted_runs["sigint_phase2"]
    assert status == 1, output[-3000:]
    checkpoint = _assert_stopped_before_any_checkpoint(output, run_dir, "2")
    assert SIGINT_PHASE_2.format(checkpoint=checkpoint) in output.splitlines()


def test_interruption_is_the_projects_error_and_exits_with_its_message() -> None:
    error = RunInterrupted("AnomalousPatchCore: SIGTERM interrupted testing; its results are incomplete.")
    assert isinstance(error, InterruptedRunError) and isinstance(error, ApcError)
    assert isinstance(error, SystemExit) and error.code == str(error)  # uncaught: the line, exit status 1
