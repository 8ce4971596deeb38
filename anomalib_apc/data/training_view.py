"""Which training batches a supervised datamodule serves to the model it trains: supervised or one-class.

The supervised datamodules move a few real anomalies into the train split and add CutPaste. Only a
model that fine-tunes on labelled anomalies (``AnomalousPatchCore``) should see those batches; a
one-class model trained on the same datamodule, e.g. anomalib's ``Patchcore`` in ``anomalib train
--data SupervisedMVTecAD`` or in the grid of ``anomalib benchmark``, would otherwise put the moved
anomalies and CutPaste patches into its memory bank. Such a model gets the real normal training
images only, the datamodule's ``normal_train_dataloader()``.

A model declares it as an :class:`~anomalib_apc.contracts.AnomalyTrainee` (``trains_on_anomalous_images
= True``); the contract module is what both layers import, so data/ still never imports models/.
"""

from typing import Any


def attached_model(trainer: Any) -> object | None:
    """The LightningModule ``trainer`` is running, or ``None`` without a trainer or a model."""
    return None if trainer is None else getattr(trainer, "lightning_module", None)
