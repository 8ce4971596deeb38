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

Imports nothing heavy (the dataloader type only for type checkers).
"""

from typing import TYPE_CHECKING, Protocol, runtime_checkable

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
