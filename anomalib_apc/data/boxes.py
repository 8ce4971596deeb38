"""Defect bounding boxes: read from YOLO ``.txt`` files or a CSV file, derived from masks, drawn as masks.

A box is ``(x0, y0, x1, y1)`` in fractions of the image's width and height, so that it fits the image
at whatever size it is read or resized to. The formats:

- YOLO (the export of most labelling tools): one ``.txt`` file per image, one line per box,
  ``class cx cy w h`` with the centre and size normalised to ``[0, 1]``; the class is not used.
- CSV: one file for a whole folder, with the header ``image,x0,y0,x1,y1`` and one row per box, in
  pixels of the image; ``image`` is the image's path relative to the CSV file's folder (or absolute).

Every reader error names the file (and line) at fault: a box outside its image, an empty file, a
line that is no box, a file in neither format.
"""

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from anomalib_apc.errors import InvalidInputError

Box = tuple[float, float, float, float]
"""``(x0, y0, x1, y1)``, fractions of the image's width and height, ``x0 < x1`` and ``y0 < y1``."""

CSV_COLUMNS = ("image", "x0", "y0", "x1", "y1")
"""The header a box CSV file must have."""

YOLO_SUFFIX = ".txt"
"""The suffix of a YOLO box file; its stem is the image's."""

_EDGE_TOLERANCE = 1e-3
"""How far (in fractions of the image) a YOLO box may reach past the edge: labelling tools round."""


def read_yolo_boxes(path: Path) -> list[Box]:
    """The boxes of one YOLO file (``class cx cy w h`` per line, normalised).

    Raises:
        InvalidInputError: The file is empty, a line is not five numbers, or a box is empty or
            reaches outside the image; the message names the file and line.
    """
    lines = [(number, line.split()) for number, line in enumerate(_read_text(path).splitlines(), 1) if line.strip()]
    if not lines:
        msg = (
            f"box file {path} is empty: an image with no box is annotated by its label alone; delete the file "
            "(or write its boxes, one line 'class cx cy w h' each)."
        )
        raise InvalidInputError(msg)
    boxes = []
    for number, fields in lines:
        where = f"box file {path} line {number}"
        values = _numbers(fields, 5, where, "'class cx cy w h' (YOLO, normalised to [0, 1])")
        centre_x, centre_y, width, height = values[1:]
        box = (centre_x - width / 2, centre_y - height / 2, centre_x + width / 2, centre_y + height / 2)
        boxes.append(_checked(box, (1.0, 1.0), where, tolerance=_EDGE_TOLERANCE))
    return boxes


def read_csv_boxes(path: Path) -> dict[Path, list[Box]]:
    """The boxes of a CSV file by image path (``image,x0,y0,x1,y1`` in pixels), normalised by each image's size.

    Each image's size is read from its header (nothing is decoded).

    Raises:
        InvalidInputError: The header is not ``image,x0,y0,x1,y1``, the file has no row, a row is not
            an image and four numbers, a listed image cannot be opened, or a box is empty or outside
            its image; the message names the file and line.
    """
    rows = list(csv.reader(_read_text(path).splitlines()))
    if not rows or tuple(cell.strip() for cell in rows[0]) != CSV_COLUMNS:
        msg = f"box file {path}: unknown format; a box CSV starts with the header {','.join(CSV_COLUMNS)}."
        raise InvalidInputError(msg)
    if len(rows) == 1:
        msg = f"box file {path} has a header but no box."
        raise InvalidInputError(msg)
    boxes: dict[Path, list[Box]] = {}
    sizes: dict[Path, tuple[int, int]] = {}
    for number, row in enumerate(rows[1:], 2):
        where = f"box file {path} line {number}"
        if len(row) != len(CSV_COLUMNS) or not row[0].strip():
            msg = f"{where}: expected an image path and four numbers (x0,y0,x1,y1 in pixels), got {row}."
            raise InvalidInputError(msg)
        image = (path.parent / row[0].strip()).resolve()
        if image not in sizes:
            sizes[image] = _header_size(image, where)
        corners = _numbers(row[1:], 4, where, "x0,y0,x1,y1 in pixels")
        boxes.setdefault(image, []).append(_checked(tuple(corners), sizes[image], where))
    return boxes


def boxes_of_mask(mask: np.ndarray) -> list[Box]:
    """The bounding box of every connected defect region of ``mask`` (8-connected, non-zero pixels)."""
    regions, _ = ndimage.label(mask != 0, structure=np.ones((3, 3), dtype=bool))
    height, width = mask.shape
    return [
        (rows_cols[1].start / width, rows_cols[0].start / height, rows_cols[1].stop / width, rows_cols[0].stop / height)
        for rows_cols in ndimage.find_objects(regions)
    ]


def boxes_mask(boxes: Sequence[Box], height: int, width: int) -> torch.Tensor:
    """The union of ``boxes`` as a ``(height, width)`` uint8 mask (1 inside a box), every touched pixel included."""
    mask = torch.zeros(height, width, dtype=torch.uint8)
    for x0, y0, x1, y1 in boxes:
        columns = slice(int(np.floor(x0 * width)), max(int(np.ceil(x1 * width)), int(np.floor(x0 * width)) + 1))
        rows = slice(int(np.floor(y0 * height)), max(int(np.ceil(y1 * height)), int(np.floor(y0 * height)) + 1))
        mask[rows, columns] = 1
    return mask


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        msg = f"cannot read box file {path}: {type(error).__name__}: {error}"
        raise InvalidInputError(msg) from error


def _numbers(fields: Sequence[str], count: int, where: str, expected: str) -> list[float]:
    try:
        values = [float(field) for field in fields]
    except ValueError:
        values = []
    if len(values) != count or not all(np.isfinite(values)):
        msg = f"{where}: expected {expected}, got {' '.join(fields)!r}."
        raise InvalidInputError(msg)
    return values


def _checked(box: Sequence[float], size: tuple[float, float], where: str, tolerance: float = 0.0) -> Box:
    """``box`` (in units of ``size``, width then height) as fractions, refused when empty or outside the image."""
    width, height = size
    x0, y0, x1, y1 = box
    if not (x0 < x1 and y0 < y1):
        msg = f"{where}: the box {list(box)} is empty (x0 < x1 and y0 < y1 are needed)."
        raise InvalidInputError(msg)
    slack_x, slack_y = tolerance * width, tolerance * height
    if x0 < -slack_x or y0 < -slack_y or x1 > width + slack_x or y1 > height + slack_y:
        msg = f"{where}: the box {list(box)} reaches outside the image ({width:g} x {height:g})."
        raise InvalidInputError(msg)
    return (max(x0 / width, 0.0), max(y0 / height, 0.0), min(x1 / width, 1.0), min(y1 / height, 1.0))


def _header_size(image: Path, where: str) -> tuple[int, int]:
    try:
        with Image.open(image) as opened:
            return opened.size
    except Exception as error:  # PIL reports unreadable headers with many exception types
        msg = f"{where}: cannot open the image {image}: {type(error).__name__}: {error}"
        raise InvalidInputError(msg) from error
