"""Checks of what fine-tuning is given: anomalies in the training set, masks for the segmentation task.

They stop a run with a message that names the files and the fix, instead of a fine-tuning that
silently learns nothing about defects (no anomaly) or learns that defects look normal (no mask).
"""

import logging

import torch
from anomalib.data import Batch

from anomalib_apc.contracts import Annotation
from anomalib_apc.errors import InvalidInputError

logger = logging.getLogger(__name__)

NO_ANOMALIES_MESSAGE = (
    "AnomalousPatchCore fine-tunes on normal AND anomalous images, but the training set has no "
    "anomalous sample. Use SupervisedMVTecAD / SupervisedFolder with num_anomalies > 0 "
    "(`--data SupervisedMVTecAD --data.num_anomalies 10`), or set finetune_epochs=0 for plain PatchCore."
)

NOT_FITTED_MESSAGE = (
    "AnomalousPatchCore has no memory bank yet: these weights are a fine-tuning checkpoint taken before phase 2 "
    "(weights/lightning/finetuning-epoch=N.ckpt). Resume its training to build the bank: "
    "`anomalib train ... --ckpt_path FILE` or Engine.fit(..., ckpt_path=FILE)."
)


def check_training_masks(batch: Batch, anomalous: torch.Tensor, annotations: torch.Tensor | None = None) -> None:
    """Refuse anomalous training images without masks; warn about empty masks (naming the images).

    An image known by its label alone (``annotations``) has an all-zero ``gt_mask`` on purpose: no warning.

    Args:
        batch: A training batch while the segmentation task is on.
        anomalous: Which images of the batch are anomalous.
        annotations: One ``Annotation`` value per image, or ``None`` (every image has its mask).
    """
    if not bool(anomalous.any()):
        return
    if batch.gt_mask is None:
        msg = (
            "The segmentation task is on, but the training batch has anomalous images without masks "
            f"({_paths(batch, anomalous)}). Use SupervisedFolder / SupervisedMVTecAD, which serve masks, boxes "
            "or the label alone (see `box_supervision`, `label_supervision`), or drop 'segmentation' from `tasks`."
        )
        raise InvalidInputError(msg)
    empty = anomalous & (batch.gt_mask.reshape(anomalous.shape[0], -1).amax(dim=1) == 0)
    if annotations is not None:
        empty &= annotations.to(empty.device) != Annotation.LABEL
    if bool(empty.any()):
        logger.warning(
            "Anomalous training images with an empty defect mask (missing mask, or a defect too small "
            "for the model's image size): %s. The segmentation loss treats them as defect-free.",
            _paths(batch, empty),
        )


def _paths(batch: Batch, selection: torch.Tensor) -> list[str]:
    paths = batch.image_path or []
    return [path for path, selected in zip(paths, selection.tolist(), strict=False) if selected]
