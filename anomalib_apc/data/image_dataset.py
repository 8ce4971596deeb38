"""anomalib's image dataset over a given samples table, read with the project's image reader.

The supervised datamodules build their samples tables themselves (masks paired by name, every image
suffix of :data:`.image_files.IMAGE_SUFFIXES`), and read images with :func:`.image_files.read_image`,
which scales 16-bit images where anomalib's reader clips them. anomalib's reader is a module-level
function that ``AnomalibDataset.__getitem__`` calls directly, so :meth:`ImageFileDataset.__getitem__`
is that method with the reader swapped; splitting, subsampling, concatenation and collation stay
anomalib's. An anomalous image without a mask gets the union of its boxes as ``gt_mask``, or an
all-zero one when only its label is known (the ``annotation`` column says which, see :mod:`.annotations`).
"""

import torch
from anomalib import TaskType
from anomalib.data.dataclasses import ImageItem
from anomalib.data.datasets.base.image import AnomalibDataset
from anomalib.data.utils import LabelName, read_mask
from pandas import DataFrame, Series
from torchvision.transforms.v2 import Transform
from torchvision.tv_tensors import Mask

from anomalib_apc.data.boxes import boxes_mask
from anomalib_apc.data.image_files import read_image
from anomalib_apc.errors import InvalidInputError


class ImageFileDataset(AnomalibDataset):
    """Images and masks listed in ``samples`` (anomalib's columns), read with the project's reader.

    A file that fails to read while training or testing raises :class:`~anomalib_apc.errors.InvalidInputError`
    naming it, instead of a reader error naming no file.

    Args:
        name: Name of the dataset, as anomalib's ``dataset.name``.
        samples: anomalib's samples table (``image_path``, ``mask_path``, ``label_index``, ``split``,
            ``attrs["task"]``).
        category: The category, as anomalib's ``dataset.category``.
        augmentations: anomalib's dataset augmentations.
    """

    def __init__(
        self,
        name: str,
        samples: DataFrame,
        category: str | None = None,
        augmentations: Transform | None = None,
    ) -> None:
        super().__init__(augmentations=augmentations)
        self._name = name
        self.samples = samples
        if category is not None:
            self.category = category

    @property
    def name(self) -> str:
        """The name given at construction (anomalib derives it from the class name otherwise)."""
        return self._name

    def __getitem__(self, index: int) -> ImageItem:
        """As ``AnomalibDataset.__getitem__``, reading the image with :func:`.image_files.read_image`."""
        sample = self.samples.iloc[index]
        image = read_image(sample.image_path)
        gt_mask = None
        if self.task == TaskType.SEGMENTATION:
            if sample.label_index == LabelName.NORMAL:
                gt_mask = Mask(torch.zeros(image.shape[-2:])).to(torch.uint8)
            elif sample.label_index == LabelName.ABNORMAL:
                gt_mask = _defect_mask(sample, image.shape[-2:])
        if self.augmentations:
            if self.task == TaskType.CLASSIFICATION:
                image = self.augmentations(image)
            else:
                # A zero mask stands in for samples of unknown label, whose gt_mask stays None.
                mask = gt_mask if gt_mask is not None else Mask(torch.zeros(image.shape[-2:])).to(torch.uint8)
                image, augmented_mask = self.augmentations(image, mask)
                gt_mask = augmented_mask if gt_mask is not None else None
        gt_label = None if sample.label_index == LabelName.UNKNOWN else torch.tensor(sample.label_index)
        return ImageItem(
            image=image,
            gt_mask=gt_mask,
            gt_label=gt_label,
            image_path=sample.image_path,
            mask_path=sample.mask_path,
        )


def _defect_mask(sample: Series, size: torch.Size) -> Mask:
    """The anomalous image's mask; without one the union of its boxes (:mod:`.annotations`), else all zero."""
    if isinstance(sample.mask_path, str) and sample.mask_path:
        return _read_mask(sample.mask_path, sample.image_path)
    boxes = sample.get("boxes")
    if boxes:
        return Mask(boxes_mask(boxes, *size))
    return Mask(torch.zeros(size, dtype=torch.uint8))


def _read_mask(mask_path: str, image_path: str) -> Mask:
    try:
        return read_mask(mask_path, as_tensor=True)
    except Exception as error:  # PIL's decoders report corrupt data with many exception types
        msg = f"cannot read mask {mask_path} of image {image_path}: {type(error).__name__}: {error}"
        raise InvalidInputError(msg) from error
