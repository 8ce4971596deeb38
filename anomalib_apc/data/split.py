"""The supervised split: which anomalies move from the test split to training, and the batches that follow.

anomalib's datamodules put anomalies in the test split only. APC fine-tunes its feature extractor
on a few real anomalies, so :class:`SupervisedSplitMixin` moves ``num_anomalies`` anomalous images,
with their masks, from the test split to the train split, drawn evenly over the defect types with
``seed`` (:func:`select_anomalies`). anomalib's datamodules stay in charge of every other split.

Training batches carry ``image``, ``gt_label`` and ``gt_mask`` (zeros for normal images). By default
a balanced sampler (:class:`.sampler.TrainDrawSampler`) draws normal and anomalous images equally
often, and with probability ``cutpaste_probability`` an anomalous draw is replaced by a CutPaste
anomaly (:class:`.train_dataset.SupervisedTrainDataset`); with ``basic_augmentations`` every training
sample, real or CutPaste, is then flipped, warped slightly and jittered in colour, image and mask alike
(:class:`.basic_augmentation.BasicAugmentation`, the paper's basic augmentations). The model's memory
bank reads :meth:`SupervisedSplitMixin.normal_train_dataloader`, which serves the real normal training
images only, never augmented by either; so does ``train_dataloader`` for a model that does not declare it
trains on anomalies (:mod:`.training_view`), e.g. anomalib's ``Patchcore``.

The chosen anomalies are recorded (:attr:`SupervisedSplitMixin.supervised_anomaly_paths`, and
``supervised_split.json`` in the trainer's ``default_root_dir``), so that a baseline can be
evaluated on exactly the same test images.
"""

import json
import logging
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from anomalib.data.datasets.base.image import AnomalibDataset
from anomalib.data.utils import LabelName
from torch.utils.data import DataLoader

from anomalib_apc.contracts import Annotation, AnomalyTrainee, trains_on_anomalous_images
from anomalib_apc.data.annotated_batch import AnnotatedImageBatch
from anomalib_apc.data.annotations import (
    annotation_counts,
    describe_counts,
    evaluation_task,
    reduce_annotations,
)
from anomalib_apc.data.basic_augmentation import BasicAugmentation
from anomalib_apc.data.cutpaste import CutPaste
from anomalib_apc.data.image_dataset import ImageFileDataset
from anomalib_apc.data.sampler import ContiguousShardSampler, TrainDrawSampler
from anomalib_apc.data.split_arguments import SplitArguments
from anomalib_apc.data.train_dataset import SupervisedTrainDataset, cutpaste_source_indices
from anomalib_apc.data.training_view import attached_model
from anomalib_apc.data.validation import check_image_files
from anomalib_apc.errors import InvalidInputError

logger = logging.getLogger(__name__)

SPLIT_FILE_NAME = "supervised_split.json"


def select_anomalies(paths_by_defect_type: Mapping[str, Sequence[str]], num_anomalies: int, seed: int) -> list[str]:
    """Pick ``num_anomalies`` paths evenly over the defect types, reproducibly from ``seed``.

    The types are visited round-robin in a seeded order and each type gives its images in a seeded
    order, so the counts per type differ by at most one, except for types that run out: they are
    skipped once empty.

    Raises:
        InvalidInputError: If fewer than ``num_anomalies`` paths are given.
    """
    available = sum(len(paths) for paths in paths_by_defect_type.values())
    if num_anomalies > available:
        msg = f"num_anomalies={num_anomalies} is more than the {available} anomalous images available."
        raise InvalidInputError(msg)
    rng = random.Random(seed)
    defect_types = sorted(paths_by_defect_type)
    rng.shuffle(defect_types)
    queues = {defect_type: sorted(paths_by_defect_type[defect_type]) for defect_type in defect_types}
    for queue in queues.values():
        rng.shuffle(queue)

    chosen: list[str] = []
    while len(chosen) < num_anomalies:
        for defect_type in defect_types:
            if queues[defect_type] and len(chosen) < num_anomalies:
                chosen.append(queues[defect_type].pop())
    return chosen


def defect_type_of(image_path: str) -> str:
    """The defect type of an anomalous image: the name of its folder (``test/<defect_type>/x.png``)."""
    return Path(image_path).parent.name


class SupervisedSplitMixin:
    """Moves ``num_anomalies`` anomalies of an anomalib image datamodule from the test to the train split.

    Put it before the anomalib datamodule among the bases (``class X(SupervisedSplitMixin, MVTecAD)``);
    the subclass's ``__init__`` calls the datamodule's ``__init__``, then :meth:`_init_supervised_split`,
    and implements :meth:`_read_datasets` for its folder layout.

    It hooks into anomalib's one-time setup sequence (``_setup``, ``_create_test_split``,
    ``_create_val_split``) at both ends: the chosen anomalies leave the test set right after the data
    is read, before anomalib derives its test and validation sets, so neither can hold them; they join
    the train set after anomalib's splits, so no split that anomalib takes from the train set
    (normal test images, synthetic validation) touches them. Then every file of every split is
    decoded once (:func:`.validation.check_image_files`), so that a bad file is named before training.
    """

    # Provided by the anomalib datamodule this mixin is combined with.
    train_data: AnomalibDataset
    test_data: AnomalibDataset
    val_data: AnomalibDataset
    seed: int
    category: str
    name: str
    trainer: Any
    train_batch_size: int
    eval_batch_size: int
    num_workers: int
    external_collate_fn: Any

    def _init_supervised_split(self, arguments: SplitArguments) -> None:
        self.num_anomalies = arguments.num_anomalies
        self.balanced_sampling = arguments.balanced_sampling
        self.cutpaste_probability = arguments.cutpaste_probability
        self.cutpaste = CutPaste(
            arguments.cutpaste_brightness, arguments.cutpaste_saturation, arguments.cutpaste_rotation_degrees
        )
        self.basic_augmentations = arguments.basic_augmentations
        self.boxes = arguments.boxes
        self.training_annotation = arguments.training_annotation
        self._training_anomalies: pd.DataFrame | None = None

    def _read_datasets(self) -> tuple[ImageFileDataset, ImageFileDataset]:
        """The train and test datasets of this layout, masks paired by name; errors name missing folders."""
        raise NotImplementedError

    def _setup(self, _stage: str | None = None) -> None:
        """Read the datasets, then take the chosen anomalies out of the test set."""
        self.train_data, self.test_data = self._read_datasets()
        if self.num_anomalies == 0:
            logger.info(
                "num_anomalies=0: %s behaves like its one-class parent: training sees normal images only, "
                "the test set keeps every anomaly, balanced sampling and CutPaste are off.",
                self.name,
            )
            self._training_anomalies = self.test_data.samples.iloc[:0]
            return
        chosen = self._take_anomalies_from_test()
        self._training_anomalies = reduce_annotations(chosen, self.training_annotation, self.name)
        self.test_data.samples.attrs["task"] = evaluation_task(self.test_data.samples, self.name)

    def _create_val_split(self) -> None:
        """Let anomalib make its validation split, add the chosen anomalies to the train set, check every file."""
        super()._create_val_split()  # type: ignore[misc]
        if self.num_anomalies:
            self._add_anomalies_to_train()
        subsets = [getattr(self, f"{name}_data", None) for name in ("train", "val", "test")]
        samples = pd.concat([subset.samples for subset in subsets if subset is not None], ignore_index=True)
        check_image_files(samples, self.name, num_threads=self.num_workers)

    def setup(self, stage: str | None = None) -> None:
        """Set up as anomalib does; attached to a trainer, also record the split in its ``default_root_dir``."""
        super().setup(stage)  # type: ignore[misc]
        trainer = self.trainer
        if self.num_anomalies and trainer is not None and trainer.is_global_zero:
            self.save_split(trainer.default_root_dir)

    def train_dataloader(self) -> DataLoader:
        """Training batches with real anomalies, balanced sampling, CutPaste and basic augmentations.

        Served to a model that declares it trains on anomalies, or read without a model attached; any other
        model gets :meth:`normal_train_dataloader`, the one-class view (see :mod:`.training_view`). With
        ``num_anomalies=0`` these are anomalib's own one-class batches, none of the above.
        """
        if self.num_anomalies == 0:
            return super().train_dataloader()  # type: ignore[misc]
        model = attached_model(self.trainer)
        if model is not None and not trains_on_anomalous_images(model):
            logger.info("%s is no %s (trains_on_anomalous_images): %s serves it the normal training images only "
                        "(one-class view).", type(model).__name__, AnomalyTrainee.__name__, self.name)
            return self.normal_train_dataloader()
        if model is not None:
            logger.info("%s trains on anomalous images: %s serves it the supervised training batches.",
                        type(model).__name__, self.name)
        dataset = SupervisedTrainDataset(
            self.train_data,
            self.cutpaste,
            self.cutpaste_probability,
            cutpaste_source_indices(self.train_data) if self.cutpaste_probability > 0 else [],
            BasicAugmentation() if self.basic_augmentations else None,
        )
        labels = self.train_data.samples.label_index.to_numpy(dtype=int).tolist()
        return DataLoader(
            dataset,
            sampler=TrainDrawSampler(labels, balanced=self.balanced_sampling, seed=self.seed, **self._replicas()),
            batch_size=self.train_batch_size,
            num_workers=self.num_workers,
            collate_fn=self.external_collate_fn or AnnotatedImageBatch.collate,
        )

    def normal_train_dataloader(self) -> DataLoader:
        """The real normal training images, in a fixed order, for the model's memory bank.

        No anomalies, no CutPaste, no basic augmentations, no sampler, no shuffling; anomalib's
        ``train_augmentations`` (if any) and the model's resizing apply as in :meth:`train_dataloader`.
        Batches are ``eval_batch_size`` large since the memory bank is filled without gradients.
        """
        labels = self.train_data.samples.label_index.to_numpy(dtype=int)
        normal_data = self.train_data.subsample(np.flatnonzero(labels == LabelName.NORMAL).tolist())
        return DataLoader(
            normal_data,
            shuffle=False,
            batch_size=self.eval_batch_size,
            num_workers=self.num_workers,
            collate_fn=self.external_collate_fn or normal_data.collate_fn,
        )

    def val_dataloader(self) -> DataLoader:
        """anomalib's validation batches; under DDP this rank's contiguous share (see :meth:`_share_of_ranks`)."""
        return self._share_of_ranks(super().val_dataloader())  # type: ignore[misc]

    def test_dataloader(self) -> DataLoader:
        """anomalib's test batches; under DDP this rank's contiguous share (see :meth:`_share_of_ranks`)."""
        return self._share_of_ranks(super().test_dataloader())  # type: ignore[misc]

    def _replicas(self) -> dict[str, int]:
        """``num_replicas`` and ``rank`` of the attached trainer's DDP processes (1 and 0 without a trainer)."""
        trainer = self.trainer
        if trainer is None:
            return {"num_replicas": 1, "rank": 0}
        return {"num_replicas": trainer.world_size, "rank": trainer.global_rank}

    def _share_of_ranks(self, loader: DataLoader) -> DataLoader:
        """Under DDP, ``loader`` reading only this rank's contiguous run of its batches.

        Lightning would otherwise shard evaluation with a padded ``DistributedSampler``, which repeats
        images to even the ranks out, and anomalib's metrics and thresholds, gathered across ranks,
        would count them twice. With :class:`.sampler.ContiguousShardSampler` every image is scored once.
        """
        replicas = self._replicas()
        if replicas["num_replicas"] == 1:
            return loader
        sampler = ContiguousShardSampler(len(loader.dataset), loader.batch_size, **replicas)
        return DataLoader(loader.dataset, sampler=sampler, batch_size=loader.batch_size,
                          num_workers=loader.num_workers, collate_fn=loader.collate_fn)

    @property
    def supervised_anomaly_paths(self) -> list[str]:
        """Image paths of the anomalies moved to training, as they appear in batches' ``image_path``."""
        return self._chosen_anomalies().image_path.tolist()

    def save_split(self, directory: str | Path) -> Path:
        """Write the split to ``directory/supervised_split.json`` and return that file.

        It holds the settings, the moved anomalies (image, mask, defect type), the counts per split
        and label, and every test image, with absolute paths.
        """
        anomalies = self._chosen_anomalies()
        record = {
            "datamodule": type(self).__name__,
            "name": self.name,
            "category": self.category,
            "seed": self.seed,
            "num_anomalies": self.num_anomalies,
            "training_annotation": self.training_annotation,
            "train_anomalies": [
                {
                    "image_path": _absolute(row.image_path),
                    "mask_path": _absolute(row.mask_path),
                    "annotation": Annotation(row.annotation).name.lower(),
                    "boxes": [list(box) for box in row.boxes] if row.boxes else None,
                    "defect_type": defect_type_of(row.image_path),
                }
                for row in anomalies.itertuples()
            ],
            "train_annotation_counts": annotation_counts(anomalies),
            "counts": self.split_counts(),
            "test_image_paths": [_absolute(path) for path in self.test_data.samples.image_path],
        }
        path = Path(directory) / SPLIT_FILE_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2))
        logger.info("Wrote the supervised split to %s", path)
        return path

    def split_counts(self) -> dict[str, dict[str, int]]:
        """Normal and anomalous image counts of each split that exists (``train``, ``val``, ``test``)."""
        subsets = {name: getattr(self, f"{name}_data", None) for name in ("train", "val", "test")}
        return {
            name: {
                "normal": int((subset.samples.label_index == LabelName.NORMAL).sum()),
                "anomalous": int((subset.samples.label_index == LabelName.ABNORMAL).sum()),
            }
            for name, subset in subsets.items()
            if subset is not None
        }

    def _take_anomalies_from_test(self) -> pd.DataFrame:
        test_samples = self.test_data.samples
        anomalous = test_samples[test_samples.label_index == LabelName.ABNORMAL]
        where = f"{self.name} (category {self.category!r})" if self.category else self.name
        if anomalous.empty:
            msg = (
                f"{where} has no anomalous test images, so num_anomalies={self.num_anomalies} cannot be moved "
                "to training. Add anomalous images (MVTec layout: test/<defect_type>/; Folder: abnormal_dir) "
                "or set num_anomalies=0 for one-class training."
            )
            raise InvalidInputError(msg)
        if self.num_anomalies >= len(anomalous):
            msg = (
                f"num_anomalies={self.num_anomalies} would take all {len(anomalous)} anomalous images of {where} "
                "into training and leave the test set none to measure on; lower num_anomalies so that some "
                "anomalies stay in the test set."
            )
            raise InvalidInputError(msg)
        paths_by_type: dict[str, list[str]] = {}
        for image_path in anomalous.image_path:
            paths_by_type.setdefault(defect_type_of(image_path), []).append(image_path)
        chosen = select_anomalies(paths_by_type, self.num_anomalies, self.seed)
        self.test_data.samples = test_samples[~test_samples.image_path.isin(chosen)].reset_index(drop=True)
        return anomalous.set_index("image_path", drop=False).loc[chosen].reset_index(drop=True)

    def _add_anomalies_to_train(self) -> None:
        train_samples = self.train_data.samples
        anomalies = self._chosen_anomalies()[train_samples.columns].assign(split="train")
        combined = pd.concat([train_samples, anomalies], ignore_index=True)
        # The segmentation task, so that every training image gets its gt_mask: its mask, its boxes, or zeros.
        combined.attrs = {**self.test_data.samples.attrs, "task": "segmentation"}
        self.train_data.samples = combined
        logger.info(
            "%s: moved %d anomalous images (%s) from test to train with seed %d; %s. Counts: %s.",
            self.name,
            self.num_anomalies,
            ", ".join(f"{kind}: {count}" for kind, count in sorted(self._defect_type_counts().items())),
            self.seed,
            describe_counts(anomalies),
            self.split_counts(),
        )

    def _chosen_anomalies(self) -> pd.DataFrame:
        if self._training_anomalies is None:
            msg = f"{self.name}: call setup() first; the anomalies are chosen there."
            raise RuntimeError(msg)
        return self._training_anomalies

    def _defect_type_counts(self) -> Counter:
        return Counter(self._chosen_anomalies().image_path.map(defect_type_of))


def _absolute(path: str | None) -> str | None:
    return str(Path(path).resolve()) if path else None
