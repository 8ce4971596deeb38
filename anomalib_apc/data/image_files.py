"""Which files are images, and how an image file becomes the tensor the model trains on.

anomalib's reader (``anomalib.data.utils.read_image``) converts every file with PIL's
``convert("RGB")``, which clips 16-bit and 32-bit grayscale values at 255: a 16-bit PNG becomes an
all-white image. :func:`read_image` scales those by the 16-bit range instead, as the bundle's
reader (``anomalib_apc.deploy.images``) does, so that training and deployment see the same pixels;
for every other mode it gives what anomalib's reader gives.

Every reader error names the file, and an image too large to decode safely (PIL's decompression-bomb
limit, ``PIL.Image.MAX_IMAGE_PIXELS``) is refused from its header, before its pixels are decoded.
"""

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2.functional import to_dtype, to_image

from anomalib_apc.data.boxes import YOLO_SUFFIX
from anomalib_apc.errors import InvalidInputError, MissingInputError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
"""The file suffixes (any letter case) read as images everywhere in the project: training data and predictions."""

_SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N"}
_UINT16_MAX = np.iinfo(np.uint16).max


def is_image_file(path: Path, suffixes: Sequence[str] = IMAGE_SUFFIXES) -> bool:
    """Whether ``path`` is a file whose suffix (in any letter case) is one of ``suffixes``."""
    return path.suffix.lower() in {suffix.lower() for suffix in suffixes} and path.is_file()


def list_image_files(folder: Path, recursive: bool = False, suffixes: Sequence[str] = IMAGE_SUFFIXES) -> list[Path]:
    """The image files in ``folder`` (and its sub-folders with ``recursive``), sorted.

    Other files are not dropped silently: they are named in a warning, so that an image in a format
    the project does not read is noticed; a YOLO box file beside its image (``x.txt``) is no such file.

    Raises:
        MissingInputError: ``folder`` is not a folder.
    """
    if not folder.is_dir():
        msg = f"{folder}: no such folder."
        raise MissingInputError(msg)
    files = sorted(path for path in (folder.rglob("*") if recursive else folder.iterdir()) if path.is_file())
    images = [path for path in files if is_image_file(path, suffixes)]
    box_files = {image.with_suffix(YOLO_SUFFIX) for image in images}  # read by .annotations, not ignored
    ignored = sorted(set(files) - set(images) - box_files)
    if ignored:
        logger.warning(
            "%s: %d file(s) ignored, not images (suffixes %s): %s",
            folder,
            len(ignored),
            ", ".join(suffixes),
            ", ".join(str(path) for path in ignored[:10]) + (" ..." if len(ignored) > 10 else ""),
        )
    return images


def open_decoded(path: str | Path) -> Image.Image:
    """The image of ``path`` with every pixel decoded (use it as a context manager to close it); errors name the file.

    Raises:
        InvalidInputError: The file is no decodable image (unknown format, truncated, corrupt), or
            it has more pixels than PIL decodes safely.
    """
    try:
        image = Image.open(path)
    except Image.DecompressionBombError as error:  # more than twice the limit: refused by PIL itself
        raise _too_large(path, str(error)) from error
    except Exception as error:  # PIL's decoders report corrupt data with many exception types
        raise _unreadable(path, error) from error
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and image.width * image.height > limit:  # PIL would only warn up to twice the limit
        image.close()
        raise _too_large(path, f"{image.width}x{image.height} px, more than {limit} pixels")
    try:
        image.load()
    except Exception as error:  # as above
        image.close()
        raise _unreadable(path, error) from error
    return image


def _too_large(path: str | Path, size: str) -> InvalidInputError:
    return InvalidInputError(
        f"image {path} is too large to decode safely ({size}; the limit is PIL.Image.MAX_IMAGE_PIXELS): shrink it"
    )


def _unreadable(path: str | Path, error: Exception) -> InvalidInputError:
    return InvalidInputError(f"cannot read image {path}: {type(error).__name__}: {error}")


def read_image(path: str | Path) -> torch.Tensor:
    """An image file as an RGB float32 tensor ``(3, H, W)`` in ``[0, 1]``, 16-bit grayscale scaled, not clipped.

    Raises:
        InvalidInputError: The file cannot be read (see :func:`open_decoded`), or holds 32-bit
            values outside the 16-bit range or float values outside ``[0, 1]``.
    """
    with open_decoded(path) as image:
        return image_to_tensor(image, str(path))


def image_to_tensor(image: Image.Image, source: str) -> torch.Tensor:
    """A decoded PIL image as an RGB float32 tensor ``(3, H, W)`` in ``[0, 1]``."""
    if image.mode not in _SIXTEEN_BIT_MODES | {"I", "F"}:
        return to_dtype(to_image(image.convert("RGB")), torch.float32, scale=True)
    array = np.asarray(image)
    if image.mode == "F":
        if array.size and not (np.nanmin(array) >= 0 and np.nanmax(array) <= 1):
            msg = f"image {source}: a float image must lie in [0, 1]"
            raise InvalidInputError(msg)
    elif array.size and (array.min() < 0 or array.max() > _UINT16_MAX):  # "I" is how PIL opens some 16-bit files
        msg = f"image {source}: 32-bit integer values outside the 16-bit range [0, {_UINT16_MAX}]"
        raise InvalidInputError(msg)
    else:
        array = array.astype(np.float32) / _UINT16_MAX
    gray = torch.from_numpy(np.array(array, dtype=np.float32))  # a copy: PIL's array is read-only
    return gray.expand(3, -1, -1).contiguous()


def decoded_size(path: str | Path) -> tuple[int, int]:
    """Width and height of an image that :func:`read_image` can read, found by decoding every pixel.

    It makes the checks :func:`read_image` makes, without building the float tensor, so that a whole
    dataset can be checked before training at the cost of decoding it once.

    Raises:
        InvalidInputError: As :func:`read_image`.
    """
    with open_decoded(path) as image:
        if image.mode in {"I", "F"}:
            image_to_tensor(image, str(path))  # the value-range checks of these modes
        return image.size
