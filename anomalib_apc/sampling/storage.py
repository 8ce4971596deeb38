"""Where the normal patches wait for the coreset: in memory, or in a memory-mapped temporary file.

A million 1,536-d patches are 6 GB of float32, 3 million 18 GB: more than a factory PC's free memory.
:class:`PatchRowCollector` takes phase 2's batches of patch rows and returns them as one tensor,
either concatenated in memory (peak: the matrix plus one batch, never two copies) or appended to an
anonymous temporary file (``tempfile``'s directory: ``TMPDIR``) and mapped back, so the operating
system pages it in while the sampler reads it. Both samplers read such a tensor as any other: the
exact one projects it whole, the chunked one block by block. The file has no name (POSIX) and is
gone when the tensor is.
"""

import logging
import tempfile
from typing import IO, Literal

import numpy as np
import torch

from anomalib_apc.errors import check_choice

logger = logging.getLogger(__name__)

PatchStorage = Literal["auto", "memory", "disk"]
PATCH_STORAGES: tuple[str, ...] = ("auto", "memory", "disk")

MEMORY_SHARE = 0.5
"""``"auto"`` keeps the patches in memory when they take at most this share of the available memory:
the projection, the model and the data loaders need the rest."""


def check_patch_storage(storage: str) -> None:
    """Refuse an unknown ``patch_storage`` name.

    Raises:
        InvalidInputError: ``storage`` is not one of :data:`PATCH_STORAGES`.
    """
    check_choice("patch_storage", storage, PATCH_STORAGES)


def _on_disk(storage: str, expected_bytes: int) -> bool:
    """Whether ``storage`` puts ``expected_bytes`` of patches on disk; ``"auto"`` logs what it chose."""
    check_patch_storage(storage)
    if storage != "auto":
        return storage == "disk"
    import psutil  # only "auto" asks for the free memory; on Linux psutil imports the POSIX-only resource module

    available = psutil.virtual_memory().available
    on_disk = expected_bytes > MEMORY_SHARE * available
    logger.info("patch_storage 'auto': about %.1f GB of normal patches, %.1f GB of memory available: %s.",
                expected_bytes / 1e9, available / 1e9, "a memory-mapped temporary file" if on_disk else "memory")
    return on_disk


def allocate_rows(shape: tuple[int, int], dtype: torch.dtype, device: torch.device, storage: str) -> torch.Tensor:
    """An uninitialised ``shape`` matrix for ``storage``'s choice: on ``device``, or memory-mapped (CPU) on disk."""
    expected_bytes = shape[0] * shape[1] * torch.empty((), dtype=dtype).element_size()
    if not _on_disk(storage, expected_bytes):
        return torch.empty(shape, dtype=dtype, device=device)
    with tempfile.TemporaryFile(prefix="anomalib-apc-patches-") as file:
        mapped = np.memmap(file, dtype=_numpy_dtype(dtype), mode="w+", shape=shape)
    return torch.from_numpy(mapped)


class PatchRowCollector:
    """Collects batches of patch rows into one matrix, in memory or in a memory-mapped temporary file.

    The choice is made at the first batch, from its size per image times ``expected_images``.

    Args:
        storage: ``"memory"``, ``"disk"``, or ``"auto"`` (disk when the expected matrix would take more
            than :data:`MEMORY_SHARE` of the available memory).
        expected_images: How many images the batches will hold in all (only ``"auto"`` reads it);
            ``None`` when the source cannot say (an iterable of batches), which ``"auto"`` keeps in memory.
    """

    def __init__(self, storage: str, expected_images: int | None) -> None:
        check_patch_storage(storage)
        self.storage = storage
        self.expected_images = expected_images
        self._batches: list[torch.Tensor] = []
        self._file: IO[bytes] | None = None
        self._rows = 0
        self._width = 0
        self._dtype = torch.float32
        self._device = torch.device("cpu")

    @property
    def on_disk(self) -> bool:
        """Whether the rows go to a file (decided at the first batch)."""
        return self._file is not None

    def add(self, rows: torch.Tensor, images: int) -> None:
        """Append a batch's ``(rows, width)`` patch rows, embedded from ``images`` images."""
        if self._rows == 0 and not self._batches:
            self._width, self._dtype, self._device = rows.shape[1], rows.dtype, rows.device
            storage = "memory" if self.expected_images is None and self.storage == "auto" else self.storage
            expected_bytes = rows.element_size() * rows.numel() * (self.expected_images or 0) // max(images, 1)
            if _on_disk(storage, expected_bytes):
                self._file = tempfile.TemporaryFile(prefix="anomalib-apc-patches-")
        self._rows += len(rows)
        if self._file is None:
            self._batches.append(rows)
        else:
            self._file.write(rows.detach().cpu().contiguous().numpy().data)

    def rows(self) -> torch.Tensor:
        """Every row added, in order, as one ``(n, width)`` tensor; the collector is empty afterwards."""
        if self._file is None:
            return concatenate_releasing(self._batches, device=self._device)
        self._file.flush()
        mapped = np.memmap(self._file, dtype=_numpy_dtype(self._dtype), mode="r+", shape=(self._rows, self._width))
        self._file.close()  # the mapping keeps the data; the file has no name left to clean up
        self._file = None
        return torch.from_numpy(mapped)


def concatenate_releasing(chunks: list[torch.Tensor], device: torch.device | str = "cpu") -> torch.Tensor:
    """Concatenate row chunks, emptying ``chunks`` as it goes.

    ``torch.cat`` holds every chunk and the result at once: twice the memory bank's patches, several
    GB at real data sizes. Copying chunk by chunk into the result while dropping each chunk keeps
    the peak at the result plus one chunk.

    Args:
        chunks: Tensors with the same trailing shape; the list is empty afterwards.
        device: Device of the empty result when there are no chunks (otherwise the chunks' device).
    """
    if not chunks:
        return torch.empty(0, device=device)
    result = chunks[0].new_empty((sum(len(chunk) for chunk in chunks), *chunks[0].shape[1:]))
    offset = 0
    chunks.reverse()
    while chunks:
        chunk = chunks.pop()
        result[offset : offset + len(chunk)] = chunk
        offset += len(chunk)
    return result


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """numpy's name for a torch dtype (float32 patches; bfloat16 has none and is refused by numpy)."""
    return torch.empty((), dtype=dtype).numpy().dtype
