"""MVTec AD layout folders as a supervised datamodule: :class:`SupervisedMVTecAD`.

The samples table has anomalib's columns and, for PNG files, anomalib's values (``MVTecAD`` with
``num_anomalies=0`` gives the same tables, plus the ``annotation`` and ``boxes`` columns of
:mod:`.annotations`), with two differences that anomalib's ``MVTecAD`` gets
wrong silently: every suffix of :data:`.image_files.IMAGE_SUFFIXES` is an image (anomalib reads
``.png`` only and drops ``.jpg`` and the rest without a word), and masks are paired by name
(:mod:`.pairing`), not by sort order.
"""

from pathlib import Path

import numpy as np
from anomalib.data import MVTecAD
from anomalib.data.datasets.image.mvtecad import CATEGORIES as MVTEC_CATEGORIES
from anomalib.data.utils import LabelName, Split, TestSplitMode, ValSplitMode, validate_path
from pandas import DataFrame
from torchvision.transforms.v2 import Transform

from anomalib_apc.data.annotations import TrainingAnnotation, annotate_samples, find_boxes
from anomalib_apc.data.image_dataset import ImageFileDataset
from anomalib_apc.data.image_files import IMAGE_SUFFIXES, list_image_files
from anomalib_apc.data.pairing import pair_masks
from anomalib_apc.data.split import SupervisedSplitMixin
from anomalib_apc.data.split_arguments import SPLIT_DEFAULTS, SplitArguments, documents_split_arguments
from anomalib_apc.errors import MissingInputError

NORMAL_LABEL = "good"
"""The folder name of normal images in ``train/`` and ``test/``."""


def mvtec_samples(category_dir: Path, where: str, boxes: str | Path | None = None) -> DataFrame:
    """anomalib's samples table of a category folder in MVTec AD layout, every split, masks paired by name.

    The table has the ``annotation`` and ``boxes`` columns of :func:`.annotations.annotate_samples`;
    boxes are YOLO files beside the anomalous images, or under ``boxes`` (mirroring ``test/``, or a CSV file).

    Raises:
        MissingInputError: ``train/good`` holds no image, ``test`` is missing, or an anomalous image
            has neither mask nor boxes while others have masks (or a mask has no image); the message
            names the folder or files.
        InvalidInputError: Two images or masks have the same name key (see :mod:`.pairing`), or a box
            file cannot be used (see :mod:`.boxes`).
    """
    normal_dir = category_dir / Split.TRAIN.value / NORMAL_LABEL
    for folder in (normal_dir, category_dir / Split.TEST.value):
        if not folder.is_dir():
            msg = (
                f"{where}: no folder {folder}. A category in MVTec AD layout holds train/good (normal training "
                "images), test/good and test/<defect type> (test images) and ground_truth/<defect type> (masks)."
            )
            raise MissingInputError(msg)
    root = validate_path(category_dir)
    rows = [
        (str(root), split, label_dir.name, str(image))
        for split in (Split.TRAIN.value, Split.TEST.value)
        for label_dir in sorted(path for path in (root / split).iterdir() if path.is_dir())
        for image in list_image_files(label_dir)
    ]
    samples = DataFrame(rows, columns=["path", "split", "label", "image_path"])
    if not (samples.label[samples.split == Split.TRAIN.value] == NORMAL_LABEL).any():
        msg = f"{where}: no normal training images in {normal_dir} (image files end in {', '.join(IMAGE_SUFFIXES)})."
        raise MissingInputError(msg)
    samples["label_index"] = np.where(samples.label == NORMAL_LABEL, LabelName.NORMAL, LabelName.ABNORMAL).astype(int)
    samples = samples.sort_values(by="image_path", ignore_index=True)

    test_dir, masks_dir = root / Split.TEST.value, root / "ground_truth"
    is_anomalous = (samples.split == Split.TEST.value) & (samples.label_index == LabelName.ABNORMAL)
    anomalous = [Path(path) for path in samples.image_path[is_anomalous]]
    mask_folders = sorted(path for path in masks_dir.iterdir() if path.is_dir()) if masks_dir.is_dir() else []
    masks = [mask for folder in mask_folders for mask in list_image_files(folder)]
    boxes_of_image = find_boxes(anomalous, [test_dir], boxes, where)
    mask_of_image = pair_masks([(test_dir, anomalous)], [(masks_dir, masks)], where, boxes_of_image) if masks else {}
    samples["mask_path"] = None  # anomalib's value for images without a mask
    if mask_of_image:
        samples.loc[is_anomalous, "mask_path"] = [_optional_str(mask_of_image.get(path)) for path in anomalous]
    samples.attrs["task"] = "segmentation"
    return annotate_samples(samples, boxes_of_image)


def _optional_str(path: Path | None) -> str | None:
    return None if path is None else str(path)


@documents_split_arguments
class SupervisedMVTecAD(SupervisedSplitMixin, MVTecAD):
    """MVTec AD layout datamodule with ``num_anomalies`` test anomalies moved to training.

    Args:
        root: Folder holding the category folders.
        category: Category folder (``train/good``, ``test/<type>``, ``ground_truth/<type>/<name>_mask.png``);
            images may be ``.png``, ``.jpg``, ``.jpeg``, ``.bmp``, ``.tif``, ``.tiff`` or ``.webp``.
        num_anomalies: Anomalous images (with masks) moved from test to train, evenly over defect types;
            0 gives anomalib's one-class ``MVTecAD``.
        {shared split arguments}
        boxes: Where defect boxes are for anomalous images without a mask: a folder mirroring ``test/``
            (``boxes/<defect type>/x.txt``, YOLO) or a CSV file (``image,x0,y0,x1,y1`` in pixels);
            ``None``: YOLO files beside the images (``test/<defect type>/x.txt``), if any. An anomalous
            image with neither mask nor box is known by its label alone (only when no image has a mask).
        num_workers: Dataloader worker processes, and the threads that decode every file once at set-up.
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
        num_anomalies: int = SPLIT_DEFAULTS.num_anomalies,
        balanced_sampling: bool = SPLIT_DEFAULTS.balanced_sampling,
        cutpaste_probability: float = SPLIT_DEFAULTS.cutpaste_probability,
        cutpaste_brightness: float = SPLIT_DEFAULTS.cutpaste_brightness,
        cutpaste_saturation: float = SPLIT_DEFAULTS.cutpaste_saturation,
        cutpaste_rotation_degrees: float = SPLIT_DEFAULTS.cutpaste_rotation_degrees,
        basic_augmentations: bool = SPLIT_DEFAULTS.basic_augmentations,
        boxes: str | Path | None = SPLIT_DEFAULTS.boxes,
        training_annotation: TrainingAnnotation = SPLIT_DEFAULTS.training_annotation,
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
        split_arguments = SplitArguments.of(locals())
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
        self._init_supervised_split(split_arguments)

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
            raise MissingInputError(msg)
        super().prepare_data()

    def _read_datasets(self) -> tuple[ImageFileDataset, ImageFileDataset]:
        samples = mvtec_samples(Path(self.root) / self.category, f"{self.name} {self.category!r}", self.boxes)
        train, test = (
            ImageFileDataset(
                self.name,
                samples[samples.split == split].reset_index(drop=True),
                category=self.category,
            )
            for split in (Split.TRAIN.value, Split.TEST.value)
        )
        return train, test
