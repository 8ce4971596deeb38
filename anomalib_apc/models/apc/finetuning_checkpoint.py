"""Checkpoints of the fine-tuning state during phase 1, so that a killed run resumes instead of starting over.

anomalib's checkpoint callback saves once, after validation, which for this model follows phase 2:
until then nothing is on disk, and an out-of-memory kill or a preemption at epoch 40 of 50 loses
every epoch. :class:`FineTuningCheckpoint` saves the whole training state (weights, optimizer,
loop progress) every ``every_n_epochs`` epochs of phase 1 with Lightning's ``Trainer.save_checkpoint``,
which is what Lightning's ``ModelCheckpoint`` calls. It is not a ``ModelCheckpoint`` because the
model adds it through ``configure_callbacks``, where Lightning lets a callback replace every trainer
callback of a parent type: a ``ModelCheckpoint`` subclass would remove anomalib's own.

Such a checkpoint has no memory bank (``_is_fitted`` false in its state): it is refused by the
bundle export and by testing, and serves to resume: ``anomalib train ... --ckpt_path FILE`` or
``Engine.fit(..., ckpt_path=FILE)`` runs the remaining epochs and phase 2. anomalib's
``Engine.train`` then tests with the same ``ckpt_path``, which would load the checkpoint's bankless
weights over the model the run just trained; :func:`keep_the_trained_model` makes that test use
the trained model. Data draws depend only on
the seed and the epoch (``TrainDrawSampler``), so a resumed run gives the uninterrupted run's bank
and scores. The epoch before phase 2 is not saved: resuming after the last epoch would leave
Lightning no epoch to run, and so no phase 2.
"""

import logging
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn

logger = logging.getLogger(__name__)

CHECKPOINT_FOLDER = Path("weights") / "lightning"
CHECKPOINT_PREFIX = "finetuning-epoch="


def finetuning_checkpoint_name(epochs_done: int) -> str:
    """File name of the checkpoint taken after ``epochs_done`` epochs."""
    return f"{CHECKPOINT_PREFIX}{epochs_done}.ckpt"


class FineTuningCheckpoint(Callback):
    """Saves ``weights/lightning/finetuning-epoch=N.ckpt`` under the run folder every ``every_n_epochs`` epochs.

    Only the newest is kept: it is written first, and the one before is removed after, so a kill while
    writing leaves the previous checkpoint intact.

    Args:
        every_n_epochs: Epochs between checkpoints (at least 1).
    """

    def __init__(self, every_n_epochs: int) -> None:
        self.every_n_epochs = every_n_epochs
        self.latest: Path | None = None  # the newest checkpoint this run wrote

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        del pl_module
        epochs_done = trainer.current_epoch + 1
        if epochs_done % self.every_n_epochs or epochs_done >= trainer.max_epochs:
            return
        path = Path(trainer.default_root_dir) / CHECKPOINT_FOLDER / finetuning_checkpoint_name(epochs_done)
        partial = path.with_name(path.name + ".partial")
        trainer.save_checkpoint(partial)  # every rank takes part; rank 0 writes, and all wait for it
        if trainer.is_global_zero:
            partial.replace(path)  # a kill while writing leaves no half-written checkpoint under the real name
            if self.latest is not None and self.latest != path:
                self.latest.unlink(missing_ok=True)
            logger.info("Fine-tuning checkpoint after epoch %d of %d: %s (resume with --ckpt_path).",
                        epochs_done, trainer.max_epochs, path)
        self.latest = path


def keep_the_trained_model(model: LightningModule, checkpoint: dict[str, Any]) -> None:
    """Keep the model's own state where a test would load a fine-tuning checkpoint over a fitted model.

    Called from the model's ``on_load_checkpoint``, before Lightning loads ``checkpoint["state_dict"]``:
    outside fitting, when the checkpoint holds no memory bank and the model has one (the run resumed
    from that checkpoint and built it), the checkpoint's state is replaced by the model's.
    """
    saved_is_fitted = checkpoint.get("state_dict", {}).get("_is_fitted")
    trainer = getattr(model, "_trainer", None)
    if saved_is_fitted is None or bool(saved_is_fitted) or not bool(model._is_fitted) or trainer is None:
        return
    if trainer.state.fn == TrainerFn.FITTING:
        return
    logger.info("The checkpoint to test was taken before phase 2 (no memory bank); testing the model this run "
                "trained from it instead.")
    checkpoint["state_dict"] = model.state_dict()
