"""What AnomalousPatchCore refuses, and why: its constructor arguments, then what fine-tuning is given.

The constructor's arguments are checked before any network is built: each message names the argument
at fault and what it accepts, so that a bad config fails at once instead of after an epoch of
fine-tuning. The network's own arguments (backbone, layers, tasks, ``num_neighbors``,
``segmentation_fusion``) are checked where they are used, in the torch model.

The training batches are checked as they come: anomalies in the training set, masks for the
segmentation task. These checks stop a run with a message that names the files and the fix, instead
of a fine-tuning that silently learns nothing about defects (no anomaly) or learns that defects look
normal (no mask).
"""

import logging
from collections.abc import Sequence
from typing import Literal

import torch
from anomalib.data import Batch

from anomalib_apc.contracts import Annotation
from anomalib_apc.errors import InvalidInputError, check_choice

from .torch_model import TASKS

logger = logging.getLogger(__name__)

FineTuneScope = Literal["all", "batchnorm_statistics"]
FINETUNE_SCOPES: tuple[str, ...] = ("all", "batchnorm_statistics")


def check_training_arguments(
    loss_weights: Sequence[float],
    finetune_epochs: int,
    finetune_scope: str,
    coreset_sampling_ratio: float,
    segmentation_fusion: float,
    checkpoint_every_n_epochs: int,
) -> None:
    """Refuse training arguments that cannot be used together.

    Raises:
        InvalidInputError: The message names the argument and the values it accepts.
    """
    if len(loss_weights) != len(TASKS) or any(weight < 0 for weight in loss_weights):
        msg = f"loss_weights must be {len(TASKS)} non-negative numbers for {list(TASKS)}, got {list(loss_weights)}."
        raise InvalidInputError(msg)
    if finetune_epochs < 0:
        msg = f"finetune_epochs must be >= 0, got {finetune_epochs}."
        raise InvalidInputError(msg)
    check_choice("finetune_scope", finetune_scope, FINETUNE_SCOPES)
    if not 0 < coreset_sampling_ratio <= 1:
        msg = f"coreset_sampling_ratio must be in (0, 1], got {coreset_sampling_ratio}."
        raise InvalidInputError(msg)
    if checkpoint_every_n_epochs < 0:
        msg = f"checkpoint_every_n_epochs must be >= 0 (0: no checkpoints), got {checkpoint_every_n_epochs}."
        raise InvalidInputError(msg)
    if segmentation_fusion > 0 and (finetune_epochs == 0 or finetune_scope != "all"):
        msg = (
            f"segmentation_fusion={segmentation_fusion} needs a trained segmentation head, but finetune_epochs="
            f"{finetune_epochs} and finetune_scope={finetune_scope!r} train none: use finetune_epochs > 0 with "
            "finetune_scope 'all', or segmentation_fusion 0."
        )
        raise InvalidInputError(msg)


POST_FINETUNING_ARGUMENTS = frozenset(
    {"reestimate_batchnorm", "segmentation_fusion", "coreset_sampler", "coreset_chunk_rows", "patch_storage"}
)
"""Constructor arguments that phase 1 never reads: models differing only in them fine-tune to the same weights.

``reestimate_batchnorm`` and the coreset's sampler, chunks and patch storage act in phase 2, ``segmentation_fusion`` at
inference; the benchmark uses this to derive such variants from APC's fine-tuned weights instead of
fine-tuning them again.
"""


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


def training_labels(batch: Batch) -> torch.Tensor:
    """The batch's image labels, which fine-tuning cannot do without.

    Raises:
        InvalidInputError: The batch has no ``gt_label`` (a datamodule that serves images only).
    """
    if batch.gt_label is None:
        msg = "AnomalousPatchCore needs image labels (gt_label) in training batches; use a supervised datamodule."
        raise InvalidInputError(msg)
    return batch.gt_label


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
