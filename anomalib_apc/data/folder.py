"""Free folder layouts as a supervised datamodule: :class:`SupervisedFolder`.

anomalib's ``make_folder_dataset`` builds the samples table (labels, splits), without masks; the
masks are then paired with the anomalous images by name (:mod:`.pairing`), where anomalib pairs
them by sort order. Images are the files ending in one of ``extensions`` (default
:data:`.image_files.IMAGE_SUFFIXES`), in the given folders and their sub-folders.
"""

from collections.abc import Sequence
from pathlib import Path

from anomalib.data import Folder
from anomalib.data.datasets.image.folder import make_folder_dataset
from anomalib.data.utils import Split, TestSplitMode, ValSplitMode
from anomalib.data.utils.path import resolve_path, validate_path
from pandas import DataFrame
from torchvision.transforms.v2 import Transform

from anomalib_apc.data.annotations import TrainingAnnotation, annotate_samples, find_boxes
from anomalib_apc.data.image_dataset import ImageFileDataset
from anomalib_apc.data.image_files import IMAGE_SUFFIXES, list_image_files
from anomalib_apc.data.pairing import pair_masks
from anomalib_apc.data.split import SupervisedSplitMixin
from anomalib_apc.data.split_arguments import SPLIT_DEFAULTS, SplitArguments, documents_split_arguments
from anomalib_apc.errors import MissingInputError

Folders = str | Path | Sequence[str | Path]


@documents_split_arguments
class SupervisedFolder(SupervisedSplitMixin, Folder):
    """Folder datamodule with ``num_anomalies`` anomalies of ``abnormal_dir`` moved to training.

    The defect type of an anomalous image is the name of its folder: give ``abnormal_dir`` one folder
    per defect type (or one folder with a sub-folder per type) for the draw to spread over types.
    Each anomalous image is known by its mask, else by its boxes, else by its label alone
    (:mod:`.annotations`). Masks (``mask_dir``) are paired with the images by name: ``x.png`` with
    ``x.png`` or ``x_mask.png`` (any image suffix), by the path relative
    to ``abnormal_dir`` and ``mask_dir`` when both have sub-folders (``bad/dent/001.png`` with
    ``masks/dent/001_mask.png``); lists of as many ``mask_dir`` as ``abnormal_dir`` pair folder by
    folder (``abnormal_dir=[bad/scratch, bad/dent]``, ``mask_dir=[masks/1_scratch, masks/2_dent]``).

    Args:
        name: Name of the dataset, used in logs and result paths.
        normal_dir: Normal images; they are the training images.
        root: Folder the other folders are relative to.
        abnormal_dir: Anomalous images, the source of the training anomalies.
        normal_test_dir: Normal test images; without it anomalib takes ``test_split_ratio`` of ``normal_dir``.
        mask_dir: Masks of the anomalous images, named like them (see above).
        num_anomalies: Anomalous images moved from test to train, evenly over defect types; 0 gives
            anomalib's one-class ``Folder``.
        {shared split arguments}
        boxes: Where defect boxes are for anomalous images without a mask (relative to ``root``): a folder
            of YOLO ``.txt`` files mirroring ``abnormal_dir`` (``boxes/dent/x.txt`` for ``bad/dent/x.png``
            with ``abnormal_dir=bad``) or a CSV file (``image,x0,y0,x1,y1`` in pixels); ``None``: YOLO
            files beside the images, if any.
        extensions: Suffixes of the image files (any letter case); default ``IMAGE_SUFFIXES``.
        num_workers: Dataloader worker processes, and the threads that decode every file once at set-up.
        seed: Seed of the anomaly choice, the sampler, CutPaste and anomalib's own splits.

    The other arguments are ``Folder``'s.
    """

    def __init__(
        self,
        name: str,
        normal_dir: Folders,
        root: str | Path | None = None,
        abnormal_dir: Folders | None = None,
        normal_test_dir: Folders | None = None,
        mask_dir: Folders | None = None,
        num_anomalies: int = SPLIT_DEFAULTS.num_anomalies,
        balanced_sampling: bool = SPLIT_DEFAULTS.balanced_sampling,
        cutpaste_probability: float = SPLIT_DEFAULTS.cutpaste_probability,
        cutpaste_brightness: float = SPLIT_DEFAULTS.cutpaste_brightness,
        cutpaste_saturation: float = SPLIT_DEFAULTS.cutpaste_saturation,
        cutpaste_rotation_degrees: float = SPLIT_DEFAULTS.cutpaste_rotation_degrees,
        basic_augmentations: bool = SPLIT_DEFAULTS.basic_augmentations,
        boxes: str | Path | None = SPLIT_DEFAULTS.boxes,
        training_annotation: TrainingAnnotation = SPLIT_DEFAULTS.training_annotation,
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
        split_arguments = SplitArguments.of(locals())
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
        self._init_supervised_split(split_arguments)

    def _read_datasets(self) -> tuple[ImageFileDataset, ImageFileDataset]:
        suffixes = self.extensions or IMAGE_SUFFIXES
        folders = {
            "normal_dir": self._folders(self.normal_dir),
            "abnormal_dir": self._folders(self.abnormal_dir),
            "normal_test_dir": self._folders(self.normal_test_dir),
            "mask_dir": self._folders(self.mask_dir),
        }
        files = {
            argument: [(folder, self._image_files(argument, folder, suffixes)) for folder in argument_folders]
            for argument, argument_folders in folders.items()
        }
        where = f"SupervisedFolder {self.name!r}"
        anomalous = [image for _, images in files["abnormal_dir"] for image in images]
        boxes = None if self.boxes is None else resolve_path(self.boxes, self.root)
        boxes_of_image = find_boxes(anomalous, folders["abnormal_dir"], boxes, where)
        mask_of_image = {}
        if files["mask_dir"] and files["abnormal_dir"]:
            mask_of_image = pair_masks(files["abnormal_dir"], files["mask_dir"], where, boxes_of_image)
        train, test = (
            ImageFileDataset(self.name, annotate_samples(samples, boxes_of_image))
            for samples in (self._split_samples(folders, suffixes, split, mask_of_image)
                            for split in (Split.TRAIN, Split.TEST))
        )
        return train, test

    @staticmethod
    def _split_samples(
        folders: dict[str, list[Path]],
        suffixes: Sequence[str],
        split: Split,
        mask_of_image: dict[Path, Path],
    ) -> DataFrame:
        """anomalib's samples table of one split (built without masks), with the masks paired by name."""
        samples = make_folder_dataset(
            normal_dir=folders["normal_dir"],
            abnormal_dir=folders["abnormal_dir"] or None,
            normal_test_dir=folders["normal_test_dir"] or None,
            split=split,
            extensions=tuple(suffixes),
        )
        if mask_of_image:
            samples["mask_path"] = [str(mask_of_image.get(Path(path), "")) for path in samples.image_path]
            samples.attrs["task"] = "segmentation"  # for the test: evaluation_task checks that every anomaly has one
        return samples

    def _folders(self, folders: Folders | None) -> list[Path]:
        if folders is None:
            return []
        listed = [folders] if isinstance(folders, str | Path) else list(folders)
        return [validate_path(resolve_path(folder, self.root), should_exist=False) for folder in listed]

    def _image_files(self, argument: str, folder: Path, suffixes: Sequence[str]) -> list[Path]:
        images = list_image_files(folder, recursive=True, suffixes=suffixes) if folder.is_dir() else []
        if not images:
            what = "no such folder" if not folder.is_dir() else f"no image files (suffixes {', '.join(suffixes)})"
            normal = " and so no normal training images" if argument == "normal_dir" else ""
            msg = f"SupervisedFolder {self.name!r}: {argument} {folder}: {what}{normal}."
            raise MissingInputError(msg)
        return images
