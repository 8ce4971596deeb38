"""What is known of each anomalous image's defect: a mask, boxes, or the label alone.

:func:`annotate_samples` adds two columns to anomalib's samples table: ``annotation`` (an
:class:`~anomalib_apc.contracts.Annotation` value per row; normal images count as fully known) and
``boxes`` (the image's defect boxes, see :mod:`.boxes`, or ``None``). An anomalous image with a mask
is ``MASK`` whatever else it has (the finer kind wins), one with boxes and no mask ``BOX``, one with
neither ``LABEL``.

Boxes are found, for each anomalous image, in a YOLO ``.txt`` file of the same stem beside the image,
or under ``boxes`` when it is given: a folder mirroring the anomalous images' folders
(``boxes/<defect type>/x.txt`` for ``<anomalous folder>/<defect type>/x.png``), or a CSV file. A box
file that matches no anomalous image is an error naming it, so that a mis-mirrored folder is not
read as "no boxes".

:func:`reduce_annotations` makes cheaper annotations out of masks on purpose (boxes of the masks'
connected regions, or nothing), so that what cheaper labelling costs can be measured on a masked dataset.
"""

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from anomalib.data.utils import LabelName
from pandas import DataFrame

from anomalib_apc.contracts import Annotation
from anomalib_apc.data.boxes import YOLO_SUFFIX, Box, boxes_of_mask, read_csv_boxes, read_yolo_boxes
from anomalib_apc.data.image_files import open_decoded
from anomalib_apc.data.messages import bulleted
from anomalib_apc.errors import InvalidInputError, MissingInputError

logger = logging.getLogger(__name__)

TrainingAnnotation = Literal["as_given", "box", "label"]
TRAINING_ANNOTATIONS: tuple[str, ...] = ("as_given", "box", "label")
"""``as_given``: each training anomaly's finest annotation; ``box``: masks replaced by their regions' boxes;
``label``: masks and boxes dropped."""


def annotate_samples(samples: DataFrame, boxes_of_image: Mapping[Path, list[Box]]) -> DataFrame:
    """``samples`` with the ``annotation`` and ``boxes`` columns (see the module docstring).

    Args:
        samples: anomalib's samples table; ``mask_path`` is empty (``None`` or ``""``) where there is no mask.
        boxes_of_image: The boxes of the anomalous images that have some (:func:`find_boxes`).
    """
    is_anomalous = (samples.label_index == LabelName.ABNORMAL).to_numpy()
    has_mask = samples.mask_path.fillna("").astype(bool).to_numpy()
    annotated = samples.copy()
    boxes = [boxes_of_image.get(Path(path)) if anomalous else None
             for path, anomalous in zip(samples.image_path, is_anomalous, strict=True)]
    annotated["boxes"] = pd.Series(boxes, index=samples.index, dtype=object)
    has_boxes = np.array([bool(image_boxes) for image_boxes in boxes], dtype=bool)
    annotated["annotation"] = np.select(
        [~is_anomalous | has_mask, has_boxes], [int(Annotation.MASK), int(Annotation.BOX)], int(Annotation.LABEL)
    )
    return annotated


def reduce_annotations(samples: DataFrame, to: TrainingAnnotation, where: str) -> DataFrame:
    """``samples`` with the anomalous images' annotations made no finer than ``to``, for measuring cheaper labels.

    ``box``: each mask becomes the boxes of its 8-connected regions (an empty mask: the label alone).
    ``label``: masks and boxes are dropped. ``as_given``: unchanged.
    """
    if to == "as_given":
        return samples
    reduced = samples.copy()
    is_anomalous = (reduced.label_index == LabelName.ABNORMAL).to_numpy()
    boxes = [
        _reduced_boxes(to, Annotation(annotation), mask_path, image_boxes) if anomalous else None
        for annotation, mask_path, image_boxes, anomalous in zip(reduced.annotation, reduced.mask_path, reduced.boxes,
                                                                 is_anomalous, strict=True)
    ]
    reduced["boxes"] = pd.Series(boxes, index=reduced.index, dtype=object)
    reduced.loc[is_anomalous, "mask_path"] = None
    has_boxes = np.array([bool(image_boxes) for image_boxes in boxes])
    reduced["annotation"] = np.where(~is_anomalous, Annotation.MASK,
                                     np.where(has_boxes, Annotation.BOX, Annotation.LABEL)).astype(int)
    logger.info("%s: training anomalies reduced to %s annotations: %s.", where, to, describe_counts(reduced))
    return reduced


def evaluation_task(test_samples: DataFrame, where: str) -> str:
    """anomalib's task for the test set: ``segmentation`` when every anomalous test image has a mask.

    A test anomaly without a mask would count as defect-free in every pixel metric, so then the test
    measures image metrics only (``classification``), with a warning saying why.
    """
    task = test_samples.attrs.get("task", "segmentation")
    anomalous = test_samples[test_samples.label_index == LabelName.ABNORMAL]
    if anomalous.empty or bool((anomalous.annotation == Annotation.MASK).all()):
        return task
    logger.warning("%s: of the %d anomalous test images, %s; without a mask for each the test measures image "
                   "metrics only.", where, len(anomalous), describe_counts(test_samples))
    return "classification"


def annotation_counts(samples: DataFrame) -> dict[str, int]:
    """How many anomalous images of ``samples`` have each kind of annotation (``mask``, ``box``, ``label``)."""
    anomalous = samples.annotation[samples.label_index == LabelName.ABNORMAL]
    counts = Counter(Annotation(int(value)).name.lower() for value in anomalous)
    return {kind.name.lower(): counts[kind.name.lower()] for kind in Annotation}


def describe_counts(samples: DataFrame) -> str:
    """``"10 with masks, 0 with boxes, 0 with the label only"`` for the anomalous images of ``samples``."""
    counts = annotation_counts(samples)
    return f"{counts['mask']} with masks, {counts['box']} with boxes, {counts['label']} with the label only"


def find_boxes(
    anomalous: Sequence[Path], roots: Sequence[Path], boxes: str | Path | None, where: str
) -> dict[Path, list[Box]]:
    """The boxes of each anomalous image that has some (see the module docstring for where they are looked for).

    Args:
        anomalous: The anomalous images.
        roots: The folders the anomalous images lie under; a box folder mirrors them.
        boxes: A folder of YOLO files, a CSV file, or ``None`` (YOLO files beside the images only).
        where: The dataset, for messages.

    Raises:
        MissingInputError: ``boxes`` does not exist.
        InvalidInputError: A box file that cannot be used or matches no anomalous image (named).
    """
    if boxes is None:
        beside = {image: image.with_suffix(YOLO_SUFFIX) for image in anomalous}
        return {image: read_yolo_boxes(path) for image, path in beside.items() if path.is_file()}
    source = Path(boxes)
    if source.is_file():
        by_path = read_csv_boxes(source)
        resolved = {image.resolve(): image for image in anomalous}
        _refuse_unmatched([path for path in by_path if path not in resolved], where, source)
        return {resolved[path]: image_boxes for path, image_boxes in by_path.items()}
    if not source.is_dir():
        msg = f"{where}: boxes {source}: no such file or folder (a folder of YOLO .txt files or a CSV file)."
        raise MissingInputError(msg)
    files = {image: source / _relative(image, roots).with_suffix(YOLO_SUFFIX) for image in anomalous}
    found = {image: path for image, path in files.items() if path.is_file()}
    used = {path.resolve() for path in found.values()}
    _refuse_unmatched([path for path in sorted(source.rglob(f"*{YOLO_SUFFIX}")) if path.resolve() not in used],
                      where, source)
    return {image: read_yolo_boxes(path) for image, path in found.items()}


def _relative(image: Path, roots: Sequence[Path]) -> Path:
    """``image``'s path below the anomalous folder it lies in (its name alone if in none)."""
    for root in roots:
        if image.is_relative_to(root):
            return image.relative_to(root)
    return Path(image.name)


def _refuse_unmatched(unmatched: Sequence[Path], where: str, source: Path) -> None:
    if unmatched:
        msg = (
            f"{where}: boxes {source} name images that are not anomalous images of the dataset (box files mirror the "
            "anomalous images' folders: boxes/<defect type>/x.txt for <defect type>/x.png):\n"
            + bulleted([str(path) for path in unmatched[:10]] + (["..."] if len(unmatched) > 10 else []))
        )
        raise InvalidInputError(msg)


def _reduced_boxes(
    to: TrainingAnnotation, annotation: Annotation, mask_path: str | None, boxes: list[Box] | None
) -> list[Box] | None:
    """An anomalous image's boxes once reduced ``to`` boxes (its mask's regions, or its own boxes) or labels (none)."""
    if to == "label":
        return None
    return _mask_boxes(mask_path) if annotation == Annotation.MASK else boxes


def _mask_boxes(mask_path: str) -> list[Box] | None:
    with open_decoded(mask_path) as mask:
        boxes = boxes_of_mask(np.asarray(mask.convert("L") if mask.mode != "L" else mask))
    return boxes or None
