"""SIGTERM and SIGINT during a run: a non-zero exit with one line saying what was interrupted.

Lightning ends a signalled run "gracefully". Its SIGTERM handler only sets ``trainer.received_sigterm``;
its loops check that flag after training batches and raise ``SIGTERMException``, a ``SystemExit``
without a code, so the process exits with status 0. Phase 2 runs inside one hook where no loop
checks, so a SIGTERM there let the run go on into validation and ``anomalib train`` into testing,
still ending with status 0. On SIGINT Lightning exits with status 1 after its own message.

This module keeps Lightning's signal handling and reads its flag earlier: :class:`InterruptionGuard`
(added by the model through ``configure_callbacks``) checks it at every batch end, epoch end and
validation end, and the model checks it between the batches of phase 2 (:func:`stop_if_terminated`).
Both raise :class:`RunInterrupted` before Lightning's own check, and before the checkpoint callback,
which runs after the guard, saves anything: an interrupted fit leaves no final checkpoint behind (the
fine-tuning checkpoints of the epochs it completed stay, to resume from: :mod:`.finetuning_checkpoint`). A
SIGINT (``KeyboardInterrupt``) keeps Lightning's exit with status 1; the guard adds the line.
"""

import logging
from collections.abc import Callable
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn

from anomalib_apc.errors import InterruptedRunError

from .finetuning_checkpoint import FineTuningCheckpoint

logger = logging.getLogger(__name__)

STAGE_ACTIVITIES = {
    "train": "training",
    "sanity_check": "the validation sanity check",
    "validate": "validation",
    "test": "testing",
    "predict": "prediction",
}


class RunInterrupted(InterruptedRunError, SystemExit):
    """A signal stopped the run; exits the process with status 1 and the message as its only output.

    It is an :class:`~anomalib_apc.errors.InterruptedRunError`, so Python callers can catch it as
    the project's error, and a ``SystemExit`` whose ``code`` is the message, so that a console script
    (``anomalib train``, which catches nothing) ends with that one line instead of a traceback.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.code = message


def interruption_message(trainer: Trainer, signal_name: str, activity: str | None) -> str:
    """One line: which signal stopped what, and what that means for the run's checkpoint."""
    stage = trainer.state.stage.value if trainer.state.stage is not None else None
    what = activity or STAGE_ACTIVITIES.get(stage, "the run")
    resumable = next((callback.latest for callback in trainer.callbacks
                      if isinstance(callback, FineTuningCheckpoint) and callback.latest is not None), None)
    if trainer.state.fn == TrainerFn.FITTING and resumable is not None:
        outcome = f"training did not finish; resume it from the fine-tuning checkpoint {resumable} (--ckpt_path)"
    elif trainer.state.fn == TrainerFn.FITTING:
        outcome = "training did not finish and no checkpoint of this run is complete"
    else:
        outcome = "its results are incomplete"
    return f"AnomalousPatchCore: {signal_name} interrupted {what}; {outcome}."


def stop_if_terminated(trainer: Trainer, activity: str | None) -> None:
    """Raise :class:`RunInterrupted` when the process got SIGTERM (Lightning's flag).

    Raises:
        RunInterrupted: ``trainer.received_sigterm`` is set.
    """
    if trainer.received_sigterm:
        raise RunInterrupted(interruption_message(trainer, "SIGTERM", activity))


class InterruptionGuard(Callback):
    """Stops the run at the next batch or epoch end after SIGTERM, and names what a SIGINT stopped.

    Args:
        activity: Returns what the model is doing (e.g. ``"phase 1 (fine-tuning, epoch 2 of 50)"``),
            or ``None`` to describe the trainer's stage instead.
    """

    def __init__(self, activity: Callable[[], str | None]) -> None:
        self.activity = activity

    def _check(self, trainer: Trainer) -> None:
        stop_if_terminated(trainer, self.activity())

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any, **kwargs: Any) -> None:
        """SIGTERM during a fine-tuning step."""
        del pl_module, args, kwargs
        self._check(trainer)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """SIGTERM between the last batch and the end of an epoch (before phase 2 and checkpointing)."""
        del pl_module
        self._check(trainer)

    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any, **kwargs: Any) -> None:
        """SIGTERM during validation (inside a fit: before the checkpoint is saved)."""
        del pl_module, args, kwargs
        self._check(trainer)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """SIGTERM at the end of validation, just before the checkpoint callback would save."""
        del pl_module
        self._check(trainer)

    def on_test_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any, **kwargs: Any) -> None:
        """SIGTERM during testing: the metrics would come from part of the test set."""
        del pl_module, args, kwargs
        self._check(trainer)

    def on_predict_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any, **kwargs: Any) -> None:
        """SIGTERM during prediction."""
        del pl_module, args, kwargs
        self._check(trainer)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """Name what a SIGINT stopped; Lightning then exits with status 1."""
        del pl_module
        if isinstance(exception, KeyboardInterrupt):
            logger.error(interruption_message(trainer, "SIGINT", self.activity()))
