"""The training set as the model sees it: real images and anomalies, CutPaste anomalies made from them, augmented.

Every item says how much of its defect is known (:class:`.annotated_batch.AnnotatedImageItem`): the
real images as annotated (see :mod:`.annotations`), a CutPaste anomaly as its source (the pasted mask
region, or the pasted box).
"""

import logging
from collections.abc import Sequence

import numpy as np
import torch
from anomalib.data.datasets.base.image import AnomalibDataset
from anomalib.data.utils import LabelName
from torch.utils.data import Dataset

from anomalib_apc.contracts import Annotation
from anomalib_apc.data.annotated_batch import AnnotatedImageItem
from anomalib_apc.data.basic_augmentation import BasicAugmentation
from anomalib_apc.data.cutpaste import CutPaste
from anomalib_apc.data.image_files import open_decoded

logger = logging.getLogger(__name__)


class SupervisedTrainDataset(Dataset):
    """The training set, indexed by ``(index, sample_seed)`` from :class:`.sampler.TrainDrawSampler`.

    A draw of an anomalous image is, with probability ``cutpaste_probability``, replaced by a CutPaste
    anomaly: a random normal training image with the defect of a random CutPaste source pasted in.
    Replacing anomalous draws (rather than relabelling normal ones) keeps the normal:anomalous ratio
    the sampler sets, and lets the few real anomalies appear in many new guises.

    Every sample, real or CutPaste, then goes through ``augmentation`` (the paper's basic
    augmentations, image and mask alike), drawn after the CutPaste choices so that switching it off
    leaves those unchanged.

    Args:
        dataset: anomalib's training dataset, anomalies included; it applies anomalib's augmentations.
        cutpaste: The CutPaste operation.
        cutpaste_probability: Probability that an anomalous draw becomes a CutPaste anomaly.
        cutpaste_source_indices: Indices of the anomalies whose defects may be cut (non-empty masks).
        augmentation: Applied to every sample; ``None`` leaves the samples as they are.
    """

    def __init__(
        self,
        dataset: AnomalibDataset,
        cutpaste: CutPaste,
        cutpaste_probability: float,
        cutpaste_source_indices: Sequence[int],
        augmentation: BasicAugmentation | None = None,
    ) -> None:
        labels = dataset.samples.label_index.to_numpy(dtype=int)
        self.dataset = dataset
        self.cutpaste = cutpaste
        self.cutpaste_probability = cutpaste_probability
        self.cutpaste_source_indices = list(cutpaste_source_indices)
        self.augmentation = augmentation
        self.normal_indices = np.flatnonzero(labels == LabelName.NORMAL).tolist()
        self.is_anomalous = labels == LabelName.ABNORMAL
        self.annotations = dataset.samples.annotation.to_numpy(dtype=int)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, draw: tuple[int, int]) -> AnnotatedImageItem:
        index, sample_seed = draw
        generator = torch.Generator().manual_seed(sample_seed)
        can_cutpaste = bool(self.is_anomalous[index] and self.cutpaste_source_indices and self.normal_indices)
        if can_cutpaste and float(torch.rand((), generator=generator)) < self.cutpaste_probability:
            item = self._cutpaste_item(generator)
        else:
            real = self.dataset[index]
            item = AnnotatedImageItem(image=real.image, gt_mask=real.gt_mask, gt_label=real.gt_label,
                                      image_path=real.image_path, mask_path=real.mask_path,
                                      annotation=torch.tensor(self.annotations[index]))
        if self.augmentation is None:
            return item
        image, mask = self.augmentation(item.image, item.gt_mask, generator)
        return item.update(in_place=False, image=image, gt_mask=mask)

    def _cutpaste_item(self, generator: torch.Generator) -> AnnotatedImageItem:
        normal = self.dataset[_pick(self.normal_indices, generator)]
        source_index = _pick(self.cutpaste_source_indices, generator)
        source = self.dataset[source_index]
        image, mask = self.cutpaste(normal.image, source.image, source.gt_mask, generator)
        return AnnotatedImageItem(image=image, gt_mask=mask, gt_label=torch.tensor(1), image_path=normal.image_path,
                                  annotation=torch.tensor(self.annotations[source_index]))


def _pick(indices: Sequence[int], generator: torch.Generator) -> int:
    return indices[int(torch.randint(len(indices), (), generator=generator))]


def cutpaste_source_indices(dataset: AnomalibDataset) -> list[int]:
    """Indices of the training anomalies whose mask or boxes mark a defect; an empty mask is explained, not cut.

    A box is cut whole (the defect and the background around it). An image known by its label alone
    has no region to cut.
    """
    samples = dataset.samples
    sources = []
    anomalous = np.flatnonzero(samples.label_index.to_numpy(dtype=int) == LabelName.ABNORMAL).tolist()
    label_only = [index for index in anomalous if samples.annotation.iloc[index] == Annotation.LABEL]
    if label_only:
        logger.info("%d training anomalies are known by their label alone: CutPaste cuts nothing from them.",
                    len(label_only))
    for index in sorted(set(anomalous) - set(label_only)):
        if samples.annotation.iloc[index] == Annotation.BOX:
            sources.append(index)
            continue
        with open_decoded(samples.mask_path.iloc[index]) as mask:
            if mask.convert("L").getbbox() is not None:
                sources.append(index)
                continue
        logger.warning(
            "Training anomaly %s has an empty mask %s: it stays a training sample labelled anomalous, "
            "but has no defect region for CutPaste to cut.",
            samples.image_path.iloc[index],
            samples.mask_path.iloc[index],
        )
    if not sources:
        logger.warning("No training anomaly has a non-empty mask or a box: CutPaste is off.")
    return sources
