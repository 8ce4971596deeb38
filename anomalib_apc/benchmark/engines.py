"""The anomalib Engines a benchmark trains and tests with, on one device or, for APC, on several (``--devices N``).

With ``devices`` > 1, APC and each APC variant fit with Lightning's DDP (``strategy="ddp"``, one
process per device, gloo on the CPU, NCCL on GPUs); everything else runs on one device in rank 0:

- Lightning's launcher re-runs the command (``sys.argv``) for ranks 1..N-1 at the first DDP fit.
  Those ranks run the same benchmark code, but only join the APC fits, in the same order as rank 0
  (:func:`is_main_process` tells them apart); they never test, never write into the output folder
  (the runner gives them a scratch folder for their Engine) and skip the baselines, which anomalib
  pins to one device (a baseline on every rank would put them all on the first device).
- After the DDP fit every model, APC included, is tested on one device in rank 0 with a single-device
  Engine: the metrics cover the whole test set exactly once, the meter sees every test image, and the
  inference times compare with the baselines'.
- The process group lives for one fit only (:func:`fit`): it is destroyed right after, on every rank.
  Left in place, every later single-device step in rank 0 would still see it: torchmetrics syncs each
  metric (and anomalib's post-processor statistics) across an initialised process group, and APC's
  phase 2 shards across it, so a test or baseline fit in rank 0 would wait forever for the other ranks.
  The next DDP fit sets a new group up from the launcher's environment variables.
"""

import logging
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

from anomalib.callbacks import ModelCheckpoint
from anomalib.engine import Engine
from anomalib.models.components import AnomalibModule
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch import distributed as dist

from anomalib_apc.benchmark.settings import BenchmarkSettings
from anomalib_apc.data import SupervisedMVTecAD
from anomalib_apc.errors import InvalidInputError

logger = logging.getLogger(__name__)

PROCESS_GROUP_TIMEOUT = timedelta(hours=4)
"""How long a rank waits for the others (a collective, or the set-up of the next DDP fit).

Ranks 1..N-1 wait at the set-up of the next APC fit while rank 0 fits the baselines and tests every
model of the previous split on one device: minutes on a GPU, up to an hour or more on a CPU at paper
sizes (anomalib's greedy coreset), beyond torch's default of 30 minutes. Four hours covers that and
still ends a run whose ranks fell out of step (a rank that failed outside a collective) the same day.
"""


def is_main_process() -> bool:
    """Whether this is rank 0: the process the user started, which tests, writes results and trains baselines.

    Lightning's ``rank_zero_only.rank`` reads the launcher's environment variables, so it is right in
    the re-run processes before any process group exists.
    """
    return rank_zero_only.rank == 0


def check_devices(settings: BenchmarkSettings) -> None:
    """Refuse ``--devices N`` that the accelerator cannot give, before any training.

    Raises:
        InvalidInputError: Lightning cannot set up ``devices`` processes on ``settings.device``.
    """
    if settings.devices == 1:
        return
    try:
        Trainer(accelerator=settings.device, devices=settings.devices, strategy="ddp", logger=False,
                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    except Exception as error:  # Lightning's MisconfigurationException, RuntimeError or ValueError
        msg = f"--devices {settings.devices} on --device {settings.device}: {error}"
        raise InvalidInputError(msg) from error


def fit_and_test(
    settings: BenchmarkSettings,
    model: AnomalibModule,
    datamodule: SupervisedMVTecAD,
    root_dir: Path,
    meter: Callback,
    distributed: bool = False,
) -> dict[str, float] | None:
    """Fit ``model`` on ``datamodule`` (``distributed``: with DDP on ``settings.devices`` devices), test it on one
    device and return the evaluator's metrics.

    The datamodule serves each model its view of the split: APC the supervised batches, a baseline the
    real normal training images only. Ranks other than 0 only take part in a DDP fit and return ``None``.
    """
    if distributed:
        fit(engine(settings, root_dir, meter, devices=settings.devices), model, datamodule)
        if not is_main_process():
            return None
        tester = engine(settings, root_dir, meter)
    else:
        tester = engine(settings, root_dir, meter)
        tester.fit(model, datamodule=datamodule)
    return tester.test(model, datamodule=datamodule, verbose=False)[0]


def fit(ddp_engine: Engine, model: AnomalibModule, datamodule: SupervisedMVTecAD) -> None:
    """A DDP fit on every rank; the process group is destroyed afterwards (see the module docstring)."""
    try:
        ddp_engine.fit(model, datamodule=datamodule)
        ddp_engine.trainer.strategy.barrier("benchmark-fit-done")  # all are done with the group before rank 0 closes it
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def engine(settings: BenchmarkSettings, root_dir: Path, meter: Callback, devices: int = 1) -> Engine:
    """anomalib's Engine without logger, checkpoint files or the validation pass, on ``devices`` devices.

    Progress is shown with tqdm bars, like the models' own embedding and coreset bars: Lightning's
    default rich bar redirects the output streams, and a tqdm bar written into that redirection
    inside Jupyter recurses until it fails (Textualize/rich#3390).
    """
    distributed = {"strategy": DDPStrategy(timeout=PROCESS_GROUP_TIMEOUT)} if devices > 1 else {}
    return Engine(
        default_root_dir=root_dir,
        logger=False,
        callbacks=[meter, ModelCheckpoint(save_top_k=0), TQDMProgressBar()],
        accelerator=settings.device,
        devices=devices,
        max_epochs=settings.finetune_epochs,  # for a trained baseline; memory-bank models and APC set their own
        limit_val_batches=0,
        enable_model_summary=False,
        **distributed,
    )


@contextmanager
def scratch_output(settings: BenchmarkSettings) -> Iterator[Path]:
    """The folder this process's run folders go to: the output in rank 0, a temporary folder on other ranks.

    Ranks 1..N-1 must not write into the output (anomalib's Engine makes a versioned folder per fit on
    every rank); theirs is deleted when the benchmark ends.
    """
    if is_main_process():
        yield settings.output
        return
    scratch = Path(tempfile.mkdtemp(prefix=f"anomalib-apc-rank{rank_zero_only.rank}-"))
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
