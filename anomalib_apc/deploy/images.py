"""Turning what a user hands the inferencer (files, PIL images, arrays, tensors) into RGB float tensors.

The result matches ``anomalib.data.utils.read_image`` for ordinary RGB files (float32 in ``[0, 1]``,
channels first), so that the bundle sees the same pixels as the Lightning model did. What anomalib
converts silently is logged here: grayscale becomes RGB (a note at INFO level), an alpha channel is
dropped (a WARNING, since transparent regions may hide content the model then sees), and a file that
cannot be decoded raises ``ImageReadError`` naming the file.

Files can be read straight to the model's input size (``read_image_file(path, size=...)``): an image
at least twice that size in each direction is reduced while it is decoded (JPEG's own DCT scaling,
then PIL's box ``reduce`` by a whole factor that keeps at least twice the size), so a 6000 x 6000
photograph never becomes a full-size float tensor; the final antialiased resize is the one the
inferencer applies to any other image.
"""

import errno
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2.functional import resize, to_dtype, to_image

from anomalib_apc.data.image_files import IMAGE_SUFFIXES
from anomalib_apc.errors import InvalidInputError, MissingInputError

logger = logging.getLogger(__name__)

ImageInput = str | Path | Image.Image | np.ndarray | torch.Tensor

UNIT_RANGE_TOLERANCE = 1e-6
"""How far outside ``[0, 1]`` a float image may lie and be clamped: rounding of resampling, not content."""

_GRAYSCALE_MODES = {"1", "L", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


class ImageReadError(InvalidInputError):
    """An image that cannot be used: unreadable file, or an array of an unusable shape or type."""


def list_image_files(paths: Iterable[str | Path]) -> list[Path]:
    """The given files, and the image files found (recursively, sorted) in the given folders.

    Symbolic links to folders are followed, once each: a link back to a folder already being searched
    (a loop) is skipped with a warning that counts them. A name with an image suffix that is not a
    readable file (a broken link, a link pointing at itself) is listed all the same, so that it gets a
    row saying why it could not be read instead of vanishing from the output.

    Raises:
        MissingInputError: A path does not exist, or a folder holds no image file.
    """
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = _image_names_below(path)
            if not found:
                msg = f"{path}: no image file ({', '.join(IMAGE_SUFFIXES)}) in this folder."
                raise MissingInputError(msg)
            files.extend(found)
        elif path.is_file() or path.is_symlink():
            files.append(path)
        else:
            msg = f"{path}: no such file or folder."
            raise MissingInputError(msg)
    return files


def _image_names_below(folder: Path) -> list[Path]:
    """Every name with an image suffix below ``folder``, sorted, following folder links that do not loop."""
    found: list[Path] = []
    loops: list[str] = []
    searched: set[str] = set()
    for directory, subfolders, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(directory)
        if real in searched:
            loops.append(directory)
            subfolders.clear()
            continue
        searched.add(real)
        found.extend(Path(directory, name) for name in names if Path(name).suffix.lower() in IMAGE_SUFFIXES)
    if loops:
        logger.warning("%s: %d linked folder(s) lead back to a folder already searched and were skipped: %s.",
                       folder, len(loops), ", ".join(loops[:5]))
    return sorted(found)


def read_image_file(path: str | Path, size: tuple[int, int] | None = None) -> torch.Tensor:
    """An image file as an RGB float tensor ``(3, H, W)`` in ``[0, 1]``, at ``size`` ``(H, W)`` if given.

    Raises:
        MissingInputError: The file does not exist.
        ImageReadError: The file is not a decodable image (truncated, corrupt, another format, or so
            large that PIL refuses it as a decompression bomb).
    """
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(_why_not_a_file(path))
    try:
        with Image.open(path) as image:
            if size is not None:
                image.draft(None, (2 * size[1], 2 * size[0]))
            image.load()
            tensor = pil_to_tensor(image if size is None else _reduced(image, size), source=str(path))
    except ImageReadError:
        raise
    # PIL's decoders fail on corrupt data in many ways (OSError, SyntaxError, ValueError, struct.error,
    # IndexError, DecompressionBombError, ...); to the user each means that this file is unusable.
    except Exception as error:
        msg = f"{path}: cannot read this file as an image ({type(error).__name__}: {error})."
        raise ImageReadError(msg) from error
    if size is not None and tuple(tensor.shape[-2:]) != tuple(size):
        tensor = resize_unit_image(tensor, size)
    return tensor


def resize_unit_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """An image in ``[0, 1]`` resized (antialiased) to ``size`` ``(H, W)``, still in ``[0, 1]``.

    Antialiased resampling is a weighted sum whose float rounding lands a few ulps outside the input
    range (1.0000001 for about one photo in twenty); those are clamped back, since they are not content.
    """
    return resize(image, list(size), antialias=True).clamp_(0.0, 1.0)


def _why_not_a_file(path: Path) -> str:
    """Why ``path`` cannot be opened as a file, naming it: a link loop, a broken link, a folder, or nothing there."""
    if path.is_symlink():
        try:
            path.resolve(strict=True)
        except (RuntimeError, OSError) as error:  # Python < 3.13 reports a loop as RuntimeError, later as ELOOP
            if isinstance(error, RuntimeError) or error.errno == errno.ELOOP:
                return f"{path}: a symbolic link loop (the link leads back to itself), not an image file."
            return f"{path}: a broken symbolic link (to {os.readlink(path)}), no image file behind it."
    if path.is_dir():
        return f"{path}: a folder, not an image file."
    return f"{path}: no such image file."


def _reduced(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """``image`` shrunk by the largest whole factor that keeps it at least twice ``size`` ``(H, W)``."""
    factor = min(image.height // (2 * size[0]), image.width // (2 * size[1]))
    if factor < 2:
        return image
    if image.mode.startswith("I;16"):
        image = image.convert("I")  # the same values, in a mode that PIL can reduce
    elif image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif image.mode == "1":
        image = image.convert("L")
    return image.reduce(factor)


def pil_to_tensor(image: Image.Image, source: str) -> torch.Tensor:
    """A PIL image as an RGB float tensor ``(3, H, W)`` in ``[0, 1]``, noting any conversion."""
    if image.mode.startswith("I;16") or image.mode in {"I", "F"}:
        # PIL's own conversion to RGB clips 16-bit and float values at 255; scale them instead.
        array = np.asarray(image)
        if image.mode == "I":  # how PIL opens 16-bit grayscale PNGs
            if array.size and (array.min() < 0 or array.max() > np.iinfo(np.uint16).max):
                msg = f"{source}: 32-bit integer image with values outside the 16-bit range."
                raise ImageReadError(msg)
            array = array.astype(np.uint16)
        return array_to_tensor(array, source)
    if image.mode in _ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
        logger.warning("%s: %s image; its alpha channel is dropped.", source, image.mode)
    elif image.mode in _GRAYSCALE_MODES:
        logger.info("%s: grayscale (%s) image, converted to RGB.", source, image.mode)
    elif image.mode != "RGB":
        logger.info("%s: %s image, converted to RGB.", source, image.mode)
    return to_dtype(to_image(image.convert("RGB")), torch.float32, scale=True)


def array_to_tensor(array: np.ndarray, source: str) -> torch.Tensor:
    """An ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` or ``(H, W, 4)`` RGB(A) array as ``(3, H, W)`` float in ``[0, 1]``.

    ``uint8`` and ``uint16`` arrays are scaled by 255 and 65535; a float array must already lie in
    ``[0, 1]`` (see :func:`_unit_range`).
    """
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3:
        msg = f"{source}: an image array must be (H, W) or (H, W, C), got shape {array.shape}."
        raise ImageReadError(msg)
    return channels_to_rgb(torch.from_numpy(_unit_range(array, source)).permute(2, 0, 1), source)


def tensor_to_tensor(tensor: torch.Tensor, source: str) -> torch.Tensor:
    """A ``(C, H, W)`` tensor (C in 1, 3, 4; float in ``[0, 1]`` or ``uint8``) as ``(3, H, W)`` float."""
    if tensor.ndim != 3:
        msg = f"{source}: an image tensor must be (C, H, W), got shape {tuple(tensor.shape)}."
        raise ImageReadError(msg)
    array = tensor.detach().cpu().numpy()
    return channels_to_rgb(torch.from_numpy(_unit_range(array, source)), source)


def channels_to_rgb(image: torch.Tensor, source: str) -> torch.Tensor:
    """``(C, H, W)`` with one, three or four channels as three RGB channels, noting any change."""
    channels = image.shape[0]
    if channels == 3:
        return image
    if channels == 1:
        logger.info("%s: grayscale image, converted to RGB.", source)
        return image.expand(3, -1, -1).contiguous()
    if channels == 4:
        logger.warning("%s: 4-channel image; its alpha channel is dropped.", source)
        return image[:3].contiguous()
    msg = f"{source}: an image needs 1 (gray), 3 (RGB) or 4 (RGBA) channels, got {channels}."
    raise ImageReadError(msg)


def _unit_range(array: np.ndarray, source: str) -> np.ndarray:
    """``array`` as float32 in ``[0, 1]``: ``uint8`` / ``uint16`` scaled by 255 / 65535, floats checked.

    A float image may stray ``UNIT_RANGE_TOLERANCE`` outside ``[0, 1]`` (what resampling a ``[0, 1]``
    image produces) and is clamped; further out, or NaN / infinite, it is refused. Other integer types
    are refused too: their range says nothing about the pixels' (an ``int64`` array of 0-255 divided by
    the ``int64`` maximum would be a black image).
    """
    if array.size == 0:
        msg = f"{source}: an empty image (array shape {array.shape})."
        raise ImageReadError(msg)
    if array.dtype in (np.uint8, np.uint16):
        return (array.astype(np.float32) / np.iinfo(array.dtype).max).astype(np.float32)
    if np.issubdtype(array.dtype, np.integer):
        msg = (f"{source}: {array.dtype} pixels (values {array.min()} to {array.max()}) have no known range; "
               "pass uint8 (0-255), uint16 (0-65535) or float in [0, 1].")
        raise ImageReadError(msg)
    if np.issubdtype(array.dtype, np.floating):
        non_finite = int(np.count_nonzero(~np.isfinite(array)))
        if non_finite:
            msg = f"{source}: {non_finite} of {array.size} values are NaN or infinite."
            raise ImageReadError(msg)
        low, high = float(array.min()), float(array.max())
        if low < -UNIT_RANGE_TOLERANCE or high > 1 + UNIT_RANGE_TOLERANCE:
            msg = (f"{source}: a float image must lie in [0, 1] (within {UNIT_RANGE_TOLERANCE:g}), "
                   f"got values in [{low:.9g}, {high:.9g}].")
            raise ImageReadError(msg)
        return np.clip(array, 0.0, 1.0).astype(np.float32)
    msg = f"{source}: unsupported image data type {array.dtype}."
    raise ImageReadError(msg)


def to_image_tensors(
    images: ImageInput | list[ImageInput] | tuple[ImageInput, ...],
    file_size: tuple[int, int] | None = None,
) -> list[tuple[torch.Tensor, str | None]]:
    """Every image of the input as ``(RGB tensor (3, H, W), its file path or None)``.

    Accepts one image or a list of them: file paths, PIL images, ``(H, W[, C])`` arrays, ``(C, H, W)``
    tensors, or a ``(B, C, H, W)`` tensor as a batch. Files are read at ``file_size`` if given.
    """
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        return [(tensor_to_tensor(image, f"image {index} of the batch"), None) for index, image in enumerate(images)]
    items = list(images) if isinstance(images, list | tuple) else [images]
    if not items:
        msg = "No image given: pass a path, an image, or a non-empty list of them."
        raise InvalidInputError(msg)
    return [_one_image(item, index, file_size) for index, item in enumerate(items)]


def _one_image(image: ImageInput, index: int, file_size: tuple[int, int] | None) -> tuple[torch.Tensor, str | None]:
    if isinstance(image, str | Path):
        return read_image_file(image, size=file_size), str(image)
    source = f"image {index}"
    if isinstance(image, Image.Image):
        return pil_to_tensor(image, source), None
    if isinstance(image, np.ndarray):
        return array_to_tensor(image, source), None
    if isinstance(image, torch.Tensor):
        return tensor_to_tensor(image, source), None
    msg = f"{source}: expected a path, PIL image, numpy array or torch tensor, got {type(image).__name__}."
    raise TypeError(msg)
