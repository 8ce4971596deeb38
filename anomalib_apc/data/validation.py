"""The set-up check: every image and mask of every split is decoded once, before any training starts.

A file that does not decode (truncated, corrupt, a PNG that passes ``PIL.Image.verify`` but whose
pixel data is broken), an image too large to decode safely, and a mask sized unlike its image are
reported together in one error naming each file. Anomalous images whose mask is all zero (a defect
that is not marked) are counted and named in a warning: the segmentation task would learn from them
that the defect looks normal, and pixel metrics find no defect in them. Files are decoded in a
thread pool (PIL releases the GIL while decoding), with a progress bar for large sets.
"""

import logging
import warnings
from concurrent.futures import ThreadPoolExecutor

from anomalib.data.utils import LabelName
from pandas import DataFrame
from PIL import Image
from tqdm.auto import tqdm

from anomalib_apc.data.image_files import decoded_size, open_decoded
from anomalib_apc.data.messages import bulleted
from anomalib_apc.errors import InvalidInputError

logger = logging.getLogger(__name__)

PROGRESS_BAR_MIN_FILES = 500
"""Below this many files the check takes about a second and shows no progress bar."""


class UnusableFilesError(InvalidInputError):
    """Files that cannot be used; :attr:`problems` maps each such file to what is wrong with it."""

    def __init__(self, where: str, problems: dict[str, str]) -> None:
        self.problems = problems
        super().__init__(f"{where}: some files cannot be used:\n" + bulleted(list(problems.values())))


def check_image_files(samples: DataFrame, where: str, num_threads: int) -> None:
    """Decode every image and mask of ``samples`` (anomalib's samples table) and check mask sizes.

    Args:
        samples: The samples of every split, concatenated.
        where: The dataset, for the error message.
        num_threads: Threads decoding at once (at least one is used).

    Raises:
        UnusableFilesError: Some files cannot be used; the message names each.
    """
    image_paths = list(dict.fromkeys(samples.image_path))
    with_masks = samples[(samples.label_index == LabelName.ABNORMAL) & samples.mask_path.astype(bool)]
    mask_of_image = dict(zip(with_masks.image_path, with_masks.mask_path, strict=True))
    mask_paths = set(mask_of_image.values())
    paths = list(dict.fromkeys(image_paths + list(mask_of_image.values())))
    with ThreadPoolExecutor(max(1, num_threads)) as pool, warnings.catch_warnings():
        # An image over PIL's limit is reported as a problem below; PIL's own warning would only repeat it.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        results = tqdm(
            pool.map(lambda path: _size_or_problem(path, is_mask=path in mask_paths), paths),
            total=len(paths),
            desc=f"{where}: decoding images",
            unit="file",
            disable=len(paths) < PROGRESS_BAR_MIN_FILES,
        )
        sizes = dict(zip(paths, results, strict=True))

    problems = {path: result for path, result in sizes.items() if isinstance(result, str)}
    empty = [image for image, mask in mask_of_image.items() if isinstance(sizes[mask], _EmptyMaskSize)]
    if empty:
        logger.warning(
            "%s: %d anomalous image(s) have an all-zero mask (no defect pixel marked), so the segmentation task "
            "learns their defect as normal and pixel metrics find no defect in them: %s. Mark the defect or "
            "remove the image.", where, len(empty), ", ".join(empty[:10]) + (" ..." if len(empty) > 10 else ""),
        )
    for image_path, mask_path in mask_of_image.items():
        image_size, mask_size = sizes[image_path], sizes[mask_path]
        if isinstance(image_size, tuple) and isinstance(mask_size, tuple) and image_size != mask_size:
            problems[mask_path] = (
                f"mask {mask_path} is {mask_size[0]}x{mask_size[1]} px but its image {image_path} "
                f"is {image_size[0]}x{image_size[1]} px"
            )
    if problems:
        raise UnusableFilesError(where, problems)


class _EmptyMaskSize(tuple):
    """The ``(width, height)`` of a mask with no defect pixel."""


def _size_or_problem(path: str, is_mask: bool) -> tuple[int, int] | str:
    """The decoded size of the file (an :class:`_EmptyMaskSize` for an all-zero mask), or what is wrong with it."""
    try:
        if not is_mask:
            return decoded_size(path)
        with open_decoded(path) as mask:
            return _EmptyMaskSize(mask.size) if mask.getbbox() is None else mask.size
    except InvalidInputError as error:
        return str(error)
