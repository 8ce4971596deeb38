"""Which training batches a supervised datamodule serves to the model it trains: supervised or one-class.

The supervised datamodules move a few real anomalies into the train split and add CutPaste. Only a
model that fine-tunes on labelled anomalies (``AnomalousPatchCore``) should see those batches; a
one-class model trained on the same datamodule, e.g. anomalib's ``Patchcore`` in ``anomalib train
--data SupervisedMVTecAD`` or in the grid of ``anomalib benchmark``, would otherwise put the moved
anomalies and CutPaste patches into its memory bank. Such a model gets the real normal training
images only, the datamodule's ``normal_train_dataloader()``.

A model declares it by a class attribute named :data:`TRAINS_ON_ANOMALIES` set to ``True``. The name
is written out here and on the model, not imported: data/ never imports models/
(``tests/test_training_view.py`` checks that the two agree).
"""

from typing import Any

TRAINS_ON_ANOMALIES = "trains_on_anomalous_images"
"""Name of the attribute a LightningModule sets to ``True`` to receive the supervised training batches."""


def trains_on_anomalous_images(model: object) -> bool:
    """Whether ``model`` declares (:data:`TRAINS_ON_ANOMALIES`) that it fine-tunes on labelled anomalies."""
    return getattr(model, TRAINS_ON_ANOMALIES, False) is True


def attached_model(trainer: Any) -> object | None:
    """The LightningModule ``trainer`` is running, or ``None`` without a trainer or a model."""
    return None if trainer is None else getattr(trainer, "lightning_module", None)
