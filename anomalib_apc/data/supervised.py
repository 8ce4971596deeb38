"""Supervised splits for anomalib's one-class image datamodules.

anomalib's datamodules put anomalies in the test split only. APC fine-tunes its feature extractor
on a few real anomalies, so :class:`SupervisedSplitMixin` moves ``num_anomalies`` anomalous images,
with their masks, from the test split to the train split, drawn evenly over the defect types with
``seed``. It is one layer on top of anomalib's datamodules, which stay in charge of reading the
data and of every other split:

- :class:`SupervisedMVTecAD` (an ``anomalib.data.MVTecAD``) for MVTec AD layout folders,
- :class:`SupervisedFolder` (an ``anomalib.data.Folder``) for free folder layouts.

Training batches carry ``image``, ``gt_label`` and ``gt_mask`` (zeros for normal images). By default
a balanced sampler draws normal and anomalous images equally often, and with probability
``cutpaste_probability`` an anomalous draw is replaced by a CutPaste anomaly: a normal training
image with the defect region of a training anomaly pasted in (see :mod:`.cutpaste`). The model's
memory bank reads :meth:`SupervisedSplitMixin.normal_train_dataloader`, which serves the real
normal training images only.

The chosen anomalies are recorded (:attr:`SupervisedSplitMixin.supervised_anomaly_paths`, and
``supervised_split.json`` in the trainer's ``default_root_dir``), so that a baseline can be
evaluated on exactly the same test images.
"""

import json
import logging
import random
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from anomalib.data import Folder, MVTecAD
from anomalib.data.dataclasses import ImageItem
from anomalib.data.datasets.base.image import AnomalibDataset
from anomalib.data.datasets.image.mvtecad import CATEGORIES as MVTEC_CATEGORIES
from anomalib.data.datasets.image.mvtecad import IMG_EXTENSIONS as MVTEC_IMAGE_EXTENSIONS
from anomalib.data.utils import LabelName, TestSplitMode, ValSplitMode, validate_and_resolve_path
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.datasets.folder import IMG_EXTENSIONS as FOLDER_IMAGE_EXTENSIONS
from torchvision.transforms.v2 import Transform

from anomalib_apc.data.cutpaste import CutPaste

logger = logging.getLogger(__name__)

SPLIT_FILE_NAME = "supervised_split.json"


def select_anomalies(paths_by_defect_type: Mapping[str, Sequence[str]], num_anomalies: int, seed: int) -> list[str]:
    """Pick ``num_anomalies`` paths evenly over the defect types, reproducibly from ``seed``.

    The types are visited round-robin in a seeded order and each type gives its images in a seeded
    order, so the counts per type differ by at most one, except for types that run out: they are
    skipped once empty.

    Raises:
        ValueError: If fewer than ``num_anomalies`` paths are given.
    """
    available = sum(len(paths) for paths in paths_by_defect_type.values())
    if num_anomalies > available:
        msg = f"num_anomalies={num_anomalies} is more than the {available} anomalous images available."
        raise ValueError(msg)
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


class TrainDrawSampler(Sampler[tuple[int, int]]):
    """Draws training indices, each with a seed for the randomness of that one sample.

    An epoch has as many draws as there are training images. With ``balanced``, draws are made with
    replacement so that normal and anomalous images come equally often (the few anomalies are
    oversampled); without it, an epoch is a random permutation. Epoch ``k`` of a sampler built with
    ``seed`` is always the same, whatever the number of dataloader workers, because the per-sample
    seeds are drawn here, in the main process.
    """

    def __init__(self, labels: Sequence[int], balanced: bool, seed: int) -> None:
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.balanced = balanced
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.labels)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch_seed = int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0])
        generator = torch.Generator().manual_seed(epoch_seed)
        self.epoch += 1
        if self.balanced:
            weight_of_each_sample = 1.0 / torch.bincount(self.labels).float()[self.labels]
            indices = torch.multinomial(weight_of_each_sample, len(self.labels), replacement=True, generator=generator)
        else:
            indices = torch.randperm(len(self.labels), generator=generator)
        sample_seeds = torch.randint(2**62, (len(self.labels),), generator=generator)
        return iter(zip(indices.tolist(), sample_seeds.tolist(), strict=True))


class SupervisedTrainDataset(Dataset):
    """The training set as the model sees it, indexed by ``(index, sample_seed)`` from :class:`TrainDrawSampler`.

    A draw of an anomalous image is, with probability ``cutpaste_probability``, replaced by a CutPaste
    anomaly: a random normal training image with the defect of a random CutPaste source pasted in.
    Replacing anomalous draws (rather than relabelling normal ones) keeps the normal:anomalous ratio
    the sampler sets, and lets the few real anomalies appear in many new guises.

    Args:
        dataset: anomalib's training dataset, anomalies included; it applies the augmentations.
        cutpaste: The CutPaste operation.
        cutpaste_probability: Probability that an anomalous draw becomes a CutPaste anomaly.
        cutpaste_source_indices: Indices of the anomalies whose defects may be cut (non-empty masks).
    """

    def __init__(
        self,
        dataset: AnomalibDataset,
        cutpaste: CutPaste,
        cutpaste_probability: float,
        cutpaste_source_indices: Sequence[int],
    ) -> None:
        labels = dataset.samples.label_index.to_numpy(dtype=int)
        self.dataset = dataset
        self.cutpaste = cutpaste
        self.cutpaste_probability = cutpaste_probability
        self.cutpaste_source_indices = list(cutpaste_source_indices)
        self.normal_indices = np.flatnonzero(labels == LabelName.NORMAL).tolist()
        self.is_anomalous = labels == LabelName.ABNORMAL

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, draw: tuple[int, int]) -> ImageItem:
        index, sample_seed = draw
        generator = torch.Generator().manual_seed(sample_seed)
        can_cutpaste = bool(self.is_anomalous[index] and self.cutpaste_source_indices and self.normal_indices)
        if can_cutpaste and float(torch.rand((), generator=generator)) < self.cutpaste_probability:
            return self._cutpaste_item(generator)
        return self.dataset[index]

    def _cutpaste_item(self, generator: torch.Generator) -> ImageItem:
        normal = self.dataset[_pick(self.normal_indices, generator)]
        source = self.dataset[_pick(self.cutpaste_source_indices, generator)]
        image, mask = self.cutpaste(normal.image, source.image, source.gt_mask, generator)
        return ImageItem(image=image, gt_mask=mask, gt_label=torch.tensor(1), image_path=normal.image_path)


def _pick(indices: Sequence[int], generator: torch.Generator) -> int:
    return indices[int(torch.randint(len(indices), (), generator=generator))]


class SupervisedSplitMixin:
    """Moves ``num_anomalies`` anomalies of an anomalib image datamodule from the test to the train split.

    Put it before the anomalib datamodule among the bases (``class X(SupervisedSplitMixin, MVTecAD)``);
    the subclass's ``__init__`` calls the datamodule's ``__init__``, then :meth:`_init_supervised_split`,
    and implements :meth:`_mask_pairing_problems` for its folder layout.

    It hooks into anomalib's one-time setup sequence (``_setup``, ``_create_test_split``,
    ``_create_val_split``) at both ends: the chosen anomalies leave the test set right after the data
    is read, before anomalib derives its test and validation sets, so neither can hold them; they join
    the train set after anomalib's splits, so no split that anomalib takes from the train set
    (normal test images, synthetic validation) touches them.
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

    def _init_supervised_split(
        self,
        num_anomalies: int,
        balanced_sampling: bool,
        cutpaste_probability: float,
        cutpaste_brightness: float,
        cutpaste_saturation: float,
        cutpaste_rotation_degrees: float,
    ) -> None:
        if num_anomalies < 0:
            msg = f"num_anomalies must be 0 or more, got {num_anomalies}."
            raise ValueError(msg)
        if not 0.0 <= cutpaste_probability <= 1.0:
            msg = f"cutpaste_probability must lie in [0, 1], got {cutpaste_probability}."
            raise ValueError(msg)
        self.num_anomalies = num_anomalies
        self.balanced_sampling = balanced_sampling
        self.cutpaste_probability = cutpaste_probability
        self.cutpaste = CutPaste(cutpaste_brightness, cutpaste_saturation, cutpaste_rotation_degrees)
        self._training_anomalies: pd.DataFrame | None = None

    def _mask_pairing_problems(self) -> list[str]:
        """Describe anomalous images without a mask and masks without an image, in this layout."""
        raise NotImplementedError

    def _setup(self, _stage: str | None = None) -> None:
        """Read the datasets (anomalib), then take the chosen anomalies out of the test set."""
        pairing_problems = self._mask_pairing_problems()
        if pairing_problems:
            msg = f"{self.name}: every anomalous image needs a mask:\n" + _bulleted(pairing_problems)
            raise FileNotFoundError(msg)
        super()._setup(_stage)  # type: ignore[misc]
        if self.num_anomalies == 0:
            logger.info(
                "num_anomalies=0: %s behaves like its one-class parent: training sees normal images only, "
                "the test set keeps every anomaly, balanced sampling and CutPaste are off.",
                self.name,
            )
            self._training_anomalies = self.test_data.samples.iloc[:0]
            return
        self._training_anomalies = self._take_anomalies_from_test()

    def _create_val_split(self) -> None:
        """Let anomalib make its validation split, then add the chosen anomalies to the train set."""
        super()._create_val_split()  # type: ignore[misc]
        if self.num_anomalies:
            self._add_anomalies_to_train()
        self._check_image_files()

    def setup(self, stage: str | None = None) -> None:
        """Set up as anomalib does; attached to a trainer, also record the split in its ``default_root_dir``."""
        super().setup(stage)  # type: ignore[misc]
        trainer = self.trainer
        if self.num_anomalies and trainer is not None and trainer.is_global_zero:
            self.save_split(trainer.default_root_dir)

    def train_dataloader(self) -> DataLoader:
        """Training batches with real anomalies, balanced sampling and CutPaste (plain anomalib if none)."""
        if self.num_anomalies == 0:
            return super().train_dataloader()  # type: ignore[misc]
        dataset = SupervisedTrainDataset(
            self.train_data,
            self.cutpaste,
            self.cutpaste_probability,
            self._cutpaste_source_indices() if self.cutpaste_probability > 0 else [],
        )
        labels = self.train_data.samples.label_index.to_numpy(dtype=int).tolist()
        return DataLoader(
            dataset,
            sampler=TrainDrawSampler(labels, balanced=self.balanced_sampling, seed=self.seed),
            batch_size=self.train_batch_size,
            num_workers=self.num_workers,
            collate_fn=self.external_collate_fn or self.train_data.collate_fn,
        )

    def normal_train_dataloader(self) -> DataLoader:
        """The real normal training images, in a fixed order, for the model's memory bank.

        No anomalies, no CutPaste, no sampler, no shuffling; the training augmentations and the
        model's resizing apply as in :meth:`train_dataloader`. Batches are ``eval_batch_size`` large
        since the memory bank is filled without gradients.
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
            "train_anomalies": [
                {
                    "image_path": _absolute(row.image_path),
                    "mask_path": _absolute(row.mask_path),
                    "defect_type": defect_type_of(row.image_path),
                }
                for row in anomalies.itertuples()
            ],
            "counts": self.split_counts(),
            "test_image_paths": [_absolute(path) for path in self.test_data.samples.image_path],
        }
        path = Path(directory) / SPLIT_FILE_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2))
        logger.info("Wrote the supervised split to %s", path)
        return path

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
            raise ValueError(msg)
        if self.num_anomalies > len(anomalous):
            msg = (
                f"num_anomalies={self.num_anomalies} is more than the {len(anomalous)} anomalous images of "
                f"{where}; lower num_anomalies so that some anomalies stay in the test set."
            )
            raise ValueError(msg)
        if self.num_anomalies == len(anomalous):
            logger.warning(
                "num_anomalies=%d takes every anomalous image of %s: the test set keeps none, so image AUROC "
                "and pixel metrics cannot be computed on it.",
                self.num_anomalies,
                where,
            )
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
        combined.attrs = dict(self.test_data.samples.attrs)  # the task: segmentation, so masks are read
        self.train_data.samples = combined
        logger.info(
            "%s: moved %d anomalous images (%s) from test to train with seed %d. Counts: %s.",
            self.name,
            self.num_anomalies,
            ", ".join(f"{kind}: {count}" for kind, count in sorted(self._defect_type_counts().items())),
            self.seed,
            self.split_counts(),
        )

    def _chosen_anomalies(self) -> pd.DataFrame:
        if self._training_anomalies is None:
            msg = f"{self.name}: call setup() first; the anomalies are chosen there."
            raise RuntimeError(msg)
        return self._training_anomalies

    def _defect_type_counts(self) -> Counter:
        return Counter(self._chosen_anomalies().image_path.map(defect_type_of))

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

    def _check_image_files(self) -> None:
        """Fail at setup, naming the files, on unreadable images and on masks sized unlike their image.

        Reads headers and checksums (``PIL.Image.verify``), not pixels, so it stays fast on large sets.
        """
        subsets = [getattr(self, f"{name}_data", None) for name in ("train", "val", "test")]
        samples = pd.concat([subset.samples for subset in subsets if subset is not None], ignore_index=True)
        problems = []
        for row in samples.drop_duplicates("image_path").itertuples():
            image_size = _verified_size(row.image_path, problems)
            if row.label_index != LabelName.ABNORMAL or not row.mask_path:
                continue
            mask_size = _verified_size(row.mask_path, problems)
            if image_size and mask_size and image_size != mask_size:
                problems.append(
                    f"mask {row.mask_path} is {mask_size[0]}x{mask_size[1]} px but its image {row.image_path} "
                    f"is {image_size[0]}x{image_size[1]} px"
                )
        if problems:
            msg = f"{self.name}: some files cannot be used:\n" + _bulleted(problems)
            raise ValueError(msg)

    def _cutpaste_source_indices(self) -> list[int]:
        """Indices of the training anomalies whose mask marks a defect; an empty mask is explained, not cut."""
        samples = self.train_data.samples
        sources = []
        for index in np.flatnonzero(samples.label_index.to_numpy(dtype=int) == LabelName.ABNORMAL).tolist():
            with Image.open(samples.mask_path.iloc[index]) as mask:
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
            logger.warning("No training anomaly has a non-empty mask: CutPaste is off.")
        return sources


def _verified_size(path: str, problems: list[str]) -> tuple[int, int] | None:
    """Width and height of an image file, or ``None`` with a note in ``problems`` if it is unreadable."""
    try:
        with Image.open(path) as image:
            size = image.size
            image.verify()
    except (OSError, SyntaxError, ValueError) as error:  # PIL reports broken files with any of these
        problems.append(f"cannot read image {path}: {error}")
        return None
    return size


def _absolute(path: str | None) -> str | None:
    return str(Path(path).resolve()) if path else None


def _bulleted(lines: Sequence[str], limit: int = 20) -> str:
    shown = [f"  - {line}" for line in lines[:limit]]
    if len(lines) > limit:
        shown.append(f"  ... and {len(lines) - limit} more")
    return "\n".join(shown)


def _pairing_problems(images: Sequence[Path], masks: Sequence[Path], match_folders: bool) -> list[str]:
    """Images with no mask of the same name, and masks with no image (``x.png`` pairs with ``x_mask.png``).

    With ``match_folders`` the mask must also lie in a folder named like the image's (MVTec's defect types).
    """

    def key(path: Path) -> tuple[str, str]:
        return (path.parent.name if match_folders else "", path.stem.removesuffix("_mask"))

    image_counts, mask_counts = Counter(map(key, images)), Counter(map(key, masks))
    lacking_mask = [path for path in images if mask_counts[key(path)] < image_counts[key(path)]]
    lacking_image = [path for path in masks if image_counts[key(path)] < mask_counts[key(path)]]
    return [f"anomalous image {path} has no mask" for path in lacking_mask] + [
        f"mask {path} has no anomalous image" for path in lacking_image
    ]


class SupervisedMVTecAD(SupervisedSplitMixin, MVTecAD):
    """MVTec AD layout datamodule with ``num_anomalies`` test anomalies moved to training.

    Args:
        root: Folder holding the category folders.
        category: Category folder (``train/good``, ``test/<type>``, ``ground_truth/<type>/<name>_mask.png``).
        num_anomalies: Anomalous images (with masks) moved from test to train, evenly over defect types;
            0 gives anomalib's one-class ``MVTecAD``.
        balanced_sampling: Draw normal and anomalous training images equally often.
        cutpaste_probability: Probability that an anomalous training draw is replaced by a CutPaste anomaly.
        cutpaste_brightness: Brightness jitter of pasted defects.
        cutpaste_saturation: Saturation jitter of pasted defects.
        cutpaste_rotation_degrees: Largest rotation of pasted defects (they are also flipped at random).
        seed: Seed of the anomaly choice, the sampler, CutPaste and anomalib's own splits.

    The other arguments are ``MVTecAD``'s.

    Example:
        >>> datamodule = SupervisedMVTecAD(root="../shared/datasets/mpdd", category="metal_plate")
        >>> datamodule.setup()
        >>> len(datamodule.supervised_anomaly_paths), datamodule.split_counts()["test"]
        (10, {'normal': 26, 'anomalous': 71})
    """

    def __init__(
        self,
        root: Path | str | None = "./datasets/MVTecAD",
        category: str = "bottle",
        num_anomalies: int = 10,
        balanced_sampling: bool = True,
        cutpaste_probability: float = 0.5,
        cutpaste_brightness: float = 0.2,
        cutpaste_saturation: float = 0.5,
        cutpaste_rotation_degrees: float = 90.0,
        train_batch_size: int = 32,
        eval_batch_size: int = 32,
        num_workers: int = 8,
        train_augmentations: Transform | None = None,
        val_augmentations: Transform | None = None,
        test_augmentations: Transform | None = None,
        augmentations: Transform | None = None,
        test_split_mode: TestSplitMode | str = TestSplitMode.FROM_DIR,
        test_split_ratio: float = 0.2,
        val_split_mode: ValSplitMode | str = ValSplitMode.SAME_AS_TEST,
        val_split_ratio: float = 0.5,
        seed: int = 0,
    ) -> None:
        super().__init__(
            root=root,
            category=category,
            train_batch_size=train_batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            train_augmentations=train_augmentations,
            val_augmentations=val_augmentations,
            test_augmentations=test_augmentations,
            augmentations=augmentations,
            test_split_mode=test_split_mode,
            test_split_ratio=test_split_ratio,
            val_split_mode=val_split_mode,
            val_split_ratio=val_split_ratio,
            seed=seed,
        )
        self._init_supervised_split(
            num_anomalies,
            balanced_sampling,
            cutpaste_probability,
            cutpaste_brightness,
            cutpaste_saturation,
            cutpaste_rotation_degrees,
        )

    def prepare_data(self) -> None:
        """Download MVTec AD only for one of its own categories; otherwise name the missing folder.

        anomalib's ``MVTecAD`` downloads the whole dataset whenever ``root/category`` is missing,
        which for a misspelt path or another dataset's category (e.g. MPDD's ``metal_plate``) means
        a 5 GB download into the wrong place, or offline a network traceback.
        """
        category_dir = Path(self.root) / self.category
        if not category_dir.is_dir() and self.category not in MVTEC_CATEGORIES:
            msg = (
                f"SupervisedMVTecAD: no folder {category_dir} and {self.category!r} is not an MVTec AD category "
                f"that could be downloaded. Point `root` at the folder holding `{self.category}/` in MVTec AD "
                "layout (train/good, test/<defect type>, ground_truth/<defect type>)."
            )
            raise FileNotFoundError(msg)
        super().prepare_data()

    def _mask_pairing_problems(self) -> list[str]:
        category_dir = Path(self.root) / self.category

        def image_files(folder: str) -> list[Path]:
            return sorted(path for path in (category_dir / folder).glob("*/*") if path.suffix in MVTEC_IMAGE_EXTENSIONS)

        anomalous_images = [path for path in image_files("test") if path.parent.name != "good"]
        return _pairing_problems(anomalous_images, image_files("ground_truth"), match_folders=True)


class SupervisedFolder(SupervisedSplitMixin, Folder):
    """Folder datamodule with ``num_anomalies`` anomalies of ``abnormal_dir`` moved to training.

    The defect type of an anomalous image is the name of its folder: give ``abnormal_dir`` one folder
    per defect type (or one folder with a sub-folder per type) for the draw to spread over types.
    Masks are needed (``mask_dir``) as soon as ``num_anomalies`` is above 0.

    Args:
        name: Name of the dataset, used in logs and result paths.
        normal_dir: Normal images; they are the training images.
        root: Folder the other folders are relative to.
        abnormal_dir: Anomalous images, the source of the training anomalies.
        normal_test_dir: Normal test images; without it anomalib takes ``test_split_ratio`` of ``normal_dir``.
        mask_dir: Masks of the anomalous images, named like them (``x.png`` or ``x_mask.png``).
        num_anomalies: Anomalous images (with masks) moved from test to train, evenly over defect types;
            0 gives anomalib's one-class ``Folder``.
        balanced_sampling: Draw normal and anomalous training images equally often.
        cutpaste_probability: Probability that an anomalous training draw is replaced by a CutPaste anomaly.
        cutpaste_brightness: Brightness jitter of pasted defects.
        cutpaste_saturation: Saturation jitter of pasted defects.
        cutpaste_rotation_degrees: Largest rotation of pasted defects (they are also flipped at random).
        seed: Seed of the anomaly choice, the sampler, CutPaste and anomalib's own splits.

    The other arguments are ``Folder``'s.
    """

    def __init__(
        self,
        name: str,
        normal_dir: str | Path | Sequence[str | Path],
        root: str | Path | None = None,
        abnormal_dir: str | Path | Sequence[str | Path] | None = None,
        normal_test_dir: str | Path | Sequence[str | Path] | None = None,
        mask_dir: str | Path | Sequence[str | Path] | None = None,
        num_anomalies: int = 10,
        balanced_sampling: bool = True,
        cutpaste_probability: float = 0.5,
        cutpaste_brightness: float = 0.2,
        cutpaste_saturation: float = 0.5,
        cutpaste_rotation_degrees: float = 90.0,
        normal_split_ratio: float = 0.2,
        extensions: tuple[str, ...] | None = None,
        train_batch_size: int = 32,
        eval_batch_size: int = 32,
        num_workers: int = 8,
        train_augmentations: Transform | None = None,
        val_augmentations: Transform | None = None,
        test_augmentations: Transform | None = None,
        augmentations: Transform | None = None,
        test_split_mode: TestSplitMode | str = TestSplitMode.FROM_DIR,
        test_split_ratio: float = 0.2,
        val_split_mode: ValSplitMode | str = ValSplitMode.FROM_TEST,
        val_split_ratio: float = 0.5,
        seed: int = 0,
    ) -> None:
        if num_anomalies > 0 and mask_dir is None:
            msg = (
                f"SupervisedFolder {name!r}: num_anomalies={num_anomalies} needs mask_dir, since training "
                "anomalies need their defect masks; set mask_dir, or num_anomalies=0 for one-class training."
            )
            raise ValueError(msg)
        super().__init__(
            name=name,
            normal_dir=normal_dir,
            root=root,
            abnormal_dir=abnormal_dir,
            normal_test_dir=normal_test_dir,
            mask_dir=mask_dir,
            normal_split_ratio=normal_split_ratio,
            extensions=extensions,
            train_batch_size=train_batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            train_augmentations=train_augmentations,
            val_augmentations=val_augmentations,
            test_augmentations=test_augmentations,
            augmentations=augmentations,
            test_split_mode=test_split_mode,
            test_split_ratio=test_split_ratio,
            val_split_mode=val_split_mode,
            val_split_ratio=val_split_ratio,
            seed=seed,
        )
        self._init_supervised_split(
            num_anomalies,
            balanced_sampling,
            cutpaste_probability,
            cutpaste_brightness,
            cutpaste_saturation,
            cutpaste_rotation_degrees,
        )

    def _mask_pairing_problems(self) -> list[str]:
        if self.mask_dir is None or self.abnormal_dir is None:
            return []
        extensions = tuple(extension.lower() for extension in (self.extensions or FOLDER_IMAGE_EXTENSIONS))

        def image_files(folders: str | Path | Sequence[str | Path]) -> list[Path]:
            folders = [folders] if isinstance(folders, str | Path) else folders
            return sorted(
                path
                for folder in folders
                for path in validate_and_resolve_path(folder, self.root).glob("**/*")
                if path.suffix.lower() in extensions and path.is_file()
            )

        return _pairing_problems(image_files(self.abnormal_dir), image_files(self.mask_dir), match_folders=False)
