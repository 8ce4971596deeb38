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

import logging
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

_GRAYSCALE_MODES = {"1", "L", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


class ImageReadError(InvalidInputError):
    """An image that cannot be used: unreadable file, or an array of an unusable shape or type."""


def list_image_files(paths: Iterable[str | Path]) -> list[Path]:
    """The given files, and the image files found (recursively, sorted) in the given folders.

    Raises:
        MissingInputError: A path does not exist, or a folder holds no image file.
    """
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                msg = f"{path}: no image file ({', '.join(IMAGE_SUFFIXES)}) in this folder."
                raise MissingInputError(msg)
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            msg = f"{path}: no such file or folder."
            raise MissingInputError(msg)
    return files


def read_image_file(path: str | Path, size: tuple[int, int] | None = None) -> torch.Tensor:
    """An image file as an RGB float tensor ``(3, H, W)`` in ``[0, 1]``, at ``size`` ``(H, W)`` if given.

    Raises:
        MissingInputError: The file does not exist.
        ImageReadError: The file is not a decodable image (truncated, corrupt, another format, or so
            large that PIL refuses it as a decompression bomb).
    """
    path = Path(path)
    if not path.is_file():
        msg = f"{path}: no such image file."
        raise MissingInputError(msg)
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
        tensor = resize(tensor, list(size), antialias=True)
    return tensor


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

    Integer arrays are scaled by their type's maximum (255 for ``uint8``, 65535 for ``uint16``); a
    float array must already lie in ``[0, 1]``.
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
    if np.issubdtype(array.dtype, np.integer):
        return (array.astype(np.float32) / np.iinfo(array.dtype).max).astype(np.float32)
    if np.issubdtype(array.dtype, np.floating):
        if array.size and (np.nanmin(array) < 0 or np.nanmax(array) > 1):
            low, high = np.nanmin(array), np.nanmax(array)
            msg = f"{source}: a float image must lie in [0, 1], got values in [{low:.3g}, {high:.3g}]."
            raise ImageReadError(msg)
        return array.astype(np.float32)
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
