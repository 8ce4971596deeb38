"""Reading the real normal training images (and the training split's anomaly count) through the contract.

PatchCore-style memory banks must be built from normal images only, without CutPaste anomalies or
the oversampling of a balanced training sampler. A datamodule that can serve them offers
``normal_train_dataloader()`` (anomalib_apc's supervised datamodules do); any other datamodule is
read through its ordinary training dataloader, keeping the images whose batch label is normal.

The model, the bundle export and the benchmark all read normal images through
:func:`normal_training_images`, so the three cannot disagree about which images build a memory bank.

A datamodule may also say how many normal and anomalous images each split holds (``split_counts()``);
the model reads it through :func:`training_anomaly_count` to refuse a training set without anomalies
before fine-tuning starts. The contract itself is :mod:`anomalib_apc.contracts`.
"""

import logging
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader

from anomalib_apc.contracts import NormalTrainingImagesSource, SplitCountsSource

logger = logging.getLogger(__name__)


def training_anomaly_count(datamodule: object) -> int | None:
    """Anomalous images in the training split of ``datamodule``; ``None`` when it cannot tell."""
    if not isinstance(datamodule, SplitCountsSource):
        return None
    train = datamodule.split_counts().get("train")
    return None if train is None else train["anomalous"]


def normal_training_dataloader(datamodule: object, fallback: DataLoader | None = None) -> DataLoader:
    """The dataloader to read normal training images from.

    Args:
        datamodule: Any datamodule; one that satisfies :class:`NormalTrainingImagesSource` serves the
            normal images itself.
        fallback: The training dataloader to filter by label otherwise; ``None`` means the datamodule's
            own ``train_dataloader()``.
    """
    if isinstance(datamodule, NormalTrainingImagesSource):
        return datamodule.normal_train_dataloader()
    logger.info("%s has no normal_train_dataloader; keeping the label-0 images of its training batches.",
                type(datamodule).__name__)
    if fallback is not None:
        return fallback
    return datamodule.train_dataloader()  # type: ignore[attr-defined]


def normal_images_of(dataloader: DataLoader) -> Iterator[torch.Tensor]:
    """Image batches of ``dataloader`` with every image not labelled normal left out (empty batches skipped)."""
    for batch in dataloader:
        if batch.gt_label is None:
            yield batch.image
            continue
        normal = batch.gt_label.to(batch.image.device) == 0
        if bool(normal.any()):
            yield batch.image[normal]


def normal_training_images(datamodule: object, fallback: DataLoader | None = None) -> Iterator[torch.Tensor]:
    """Raw image batches of the real normal training images of ``datamodule`` (see the module docstring)."""
    return normal_images_of(normal_training_dataloader(datamodule, fallback))
