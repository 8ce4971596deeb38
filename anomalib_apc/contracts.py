"""The contract between models and datamodules, defined once at the bottom of the import graph.

Models never import datamodules and datamodules never import models; both import this module.
Everything here is structural (``typing.Protocol``): a class satisfies a contract by having the
method or attribute, without a base class, so anomalib's own datamodules and models take part as
they are.

- :class:`NormalTrainingImagesSource`: "give me the real normal training images". PatchCore-style
  memory banks are built from them only, without CutPaste anomalies or a balanced sampler's
  oversampling (read by the model's phase 2, the bundle export and the benchmark).
- :class:`SplitCountsSource`: how many normal and anomalous images each split holds, so that a model
  can refuse a training set without anomalies before fine-tuning starts.
- :class:`AnomalyTrainee`: a model that fine-tunes on labelled anomalies; the supervised
  datamodules serve their supervised batches to such a model and the one-class view to any other.
- :class:`Annotation`: how much of a training image's defect is known (a mask, boxes or the label
  alone); supervised training batches carry one per image (:func:`annotations_of`), so that the model's
  losses use what is known and nothing more.

Imports nothing heavy (the dataloader type only for type checkers).
"""

from enum import IntEnum
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from torch.utils.data import DataLoader


@runtime_checkable
class NormalTrainingImagesSource(Protocol):
    """A datamodule that can serve its real normal training images, in a fixed order."""

    def normal_train_dataloader(self) -> "DataLoader":
        """Batches of the real normal training images only (no synthetic anomalies, no oversampling)."""
        ...


@runtime_checkable
class SplitCountsSource(Protocol):
    """A datamodule that can count the normal and anomalous images of its splits once set up."""

    def split_counts(self) -> dict[str, dict[str, int]]:
        """``{"train": {"normal": n, "anomalous": a}, ...}`` for each split that exists."""
        ...


@runtime_checkable
class AnomalyTrainee(Protocol):
    """A model that fine-tunes on labelled anomalies: it sets ``trains_on_anomalous_images = True``."""

    trains_on_anomalous_images: bool


def trains_on_anomalous_images(model: object) -> bool:
    """Whether ``model`` declares (:class:`AnomalyTrainee`) that it fine-tunes on labelled anomalies."""
    return isinstance(model, AnomalyTrainee) and model.trains_on_anomalous_images is True


class Annotation(IntEnum):
    """How much of a training image's defect is known; the batch's ``gt_mask`` means what the kind says.

    Ordered from finest to coarsest: an image with two kinds uses the smaller value.
    """

    MASK = 0
    """Every pixel is known: the defect mask of an anomalous image, or a normal image (all normal)."""
    BOX = 1
    """``gt_mask`` is the union of the defect's boxes: pixels outside every box are normal, inside only some are."""
    LABEL = 2
    """Only the image label is known; ``gt_mask`` is all zero and says nothing about the defect's pixels."""


ANNOTATION_FIELD = "annotation"
"""The batch attribute holding one :class:`Annotation` value per image (a ``(B,)`` integer tensor)."""


def annotations_of(batch: Any) -> Any:
    """The batch's per-image :class:`Annotation` values, or ``None`` for a batch without them (all masks)."""
    return getattr(batch, ANNOTATION_FIELD, None)
