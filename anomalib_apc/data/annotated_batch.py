"""anomalib's image item and batch with one more field: how much of each image's defect is known.

The field (:data:`~anomalib_apc.contracts.ANNOTATION_FIELD`) holds one
:class:`~anomalib_apc.contracts.Annotation` value per image. It is per image, not per pixel, so
anomalib's pre-processing, which resizes ``image`` and ``gt_mask`` on the device, keeps it valid:
``gt_mask`` itself carries the mask, or the union of the boxes. Only the supervised training batches
are of these classes; validation, test and the memory bank's batches stay anomalib's.
"""

from dataclasses import dataclass
from typing import ClassVar

import torch
from anomalib.data.dataclasses import ImageBatch, ImageItem


@dataclass
class AnnotatedImageItem(ImageItem):
    """anomalib's ``ImageItem`` with ``annotation``, a 0-d integer tensor (an ``Annotation`` value)."""

    annotation: torch.Tensor | None = None


@dataclass
class AnnotatedImageBatch(ImageBatch):
    """anomalib's ``ImageBatch`` with ``annotation``, a ``(B,)`` tensor; collates :class:`AnnotatedImageItem`s."""

    item_class: ClassVar[type[ImageItem]] = AnnotatedImageItem
    annotation: torch.Tensor | None = None
