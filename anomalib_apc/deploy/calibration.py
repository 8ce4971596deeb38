"""Images that a bundle export calibrates, measures and verifies on, and their patch rows.

They come from a folder (searched recursively) or from a datamodule's normal training images,
through the one contract between model and data (``normal_training_images``), and are brought to
the model's input size as they are read.
"""

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from anomalib.data import AnomalibDataModule
from torchvision.transforms import v2
from tqdm import tqdm

from anomalib_apc.errors import InvalidInputError, MissingInputError
from anomalib_apc.models.apc.normal_images import normal_training_images

from .images import list_image_files, read_image_file
from .quantization import DEFECTIVE_LABEL, NORMAL_LABEL, ValidationImages

# Patch rows used to measure recall and how often the bound settles a query.
MAX_QUERY_PATCHES = 4096
VALIDATION_SOURCE = "validation image patches"


def read_calibration_images(
    folder: str | Path | None,
    datamodule: AnomalibDataModule | None,
    image_size: tuple[int, int],
    limit: int,
) -> torch.Tensor | None:
    """RGB images ``(N, 3, H, W)`` in ``[0, 1]`` at the model's input size, or ``None`` without a source.

    Raises:
        MissingInputError: The folder or datamodule gives no image.
    """
    if folder is not None:
        source: Iterator[torch.Tensor] = (
            read_image_file(path, size=image_size)[None] for path in list_image_files([folder])[:limit]
        )
    elif datamodule is not None:
        datamodule.setup("fit")
        source = normal_training_images(datamodule)
    else:
        return None
    images: list[torch.Tensor] = []
    with tqdm(total=limit, desc="Reading calibration images", unit="image") as progress:
        for batch in source:
            batch = batch[: limit - len(images)]
            images.extend(v2.functional.resize(image, list(image_size), antialias=True) for image in batch)
            progress.update(len(batch))
            if len(images) >= limit:
                break
    if not images:
        msg = f"No calibration image found in {folder or type(datamodule).__name__}."
        raise MissingInputError(msg)
    return torch.stack(images)


NORMAL_FOLDER = "good"


def read_validation_images(
    folder: str | Path, image_size: tuple[int, int], transform: Callable[[torch.Tensor], torch.Tensor],
) -> ValidationImages:
    """Pre-processed labelled images of a folder in anomalib's ``test`` layout: ``good/`` normal, the rest defective.

    Raises:
        MissingInputError: ``folder`` does not exist.
        InvalidInputError: It lacks normal or defective images (an AUROC needs both).
    """
    root = Path(folder)
    if not root.is_dir():
        msg = f"--validation-images {root}: no such folder."
        raise MissingInputError(msg)
    files = list_image_files([root])
    labels = [NORMAL_LABEL if path.relative_to(root).parts[0] == NORMAL_FOLDER else DEFECTIVE_LABEL for path in files]
    if NORMAL_LABEL not in labels or DEFECTIVE_LABEL not in labels:
        msg = (f"--validation-images {root}: needs normal images in {root / NORMAL_FOLDER} and defective images in "
               f"other subfolders; found {labels.count(NORMAL_LABEL)} normal and {labels.count(DEFECTIVE_LABEL)} "
               "defective.")
        raise InvalidInputError(msg)
    images = torch.stack([
        v2.functional.resize(read_image_file(path, size=image_size), list(image_size), antialias=True)
        for path in tqdm(files, desc="Reading validation images", unit="image")
    ])
    return ValidationImages(transform(images), torch.tensor(labels))


@dataclass(frozen=True)
class SampleQueries:
    """Patch rows on which an export measures its search (the bound's speed, an index's recall).

    Attributes:
        rows: Up to ``MAX_QUERY_PATCHES`` patch rows ``(N, D)``, a fixed random choice.
        source: Which images they came from, as the bundle's metadata records it.
    """

    rows: np.ndarray
    source: str


def sample_queries(
    embed: Callable[[torch.Tensor], np.ndarray],
    calibration_inputs: torch.Tensor | None,
    validation: ValidationImages | None,
) -> SampleQueries | None:
    """Patches of the validation images if given, else of the calibration images, else ``None``.

    ``embed`` maps pre-processed images to patch rows ``(B, h, w, D)``: the deployed graph, so that
    an INT8 bundle is measured with the queries it will search with.

    Validation images come first: the memory bank was not drawn from them and their defects lie far
    from it, as the patches a deployed model meets do. Calibration images are the memory bank's own
    images, so their patches lie next to (often in) it, and an approximate index looks better on
    them than on test images.
    """
    if validation is not None:
        model_inputs, source = validation.model_inputs, VALIDATION_SOURCE
    elif calibration_inputs is not None:
        model_inputs, source = calibration_inputs, "calibration image patches (the memory bank's own images)"
    else:
        return None
    patches = [embed(batch) for batch in model_inputs.split(8)]
    rows = np.concatenate([batch_patches.reshape(-1, batch_patches.shape[-1]) for batch_patches in patches])
    choice = np.random.default_rng(0).permutation(len(rows))[:MAX_QUERY_PATCHES]
    return SampleQueries(np.ascontiguousarray(rows[np.sort(choice)], dtype=np.float32), source)
