"""Phase 2: PatchCore's memory bank from the real normal training images, on one device or several.

Under DDP each rank embeds its contiguous share of the normal images, rank 0 gathers the patches in
the single-process order, selects the coreset once and broadcasts it (see :mod:`.distributed`), so
every rank holds the memory bank one process would build. Everything runs in float32 and the
standard memory layout (see :mod:`.precision`): the bank, the coreset and the scores are then those
of a model loaded from the checkpoint in a fresh process.
"""

import logging
from collections.abc import Callable, Iterable
from functools import partial
from typing import TypeVar

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from .batchnorm import reestimate_batchnorm_statistics
from .distributed import broadcast_from_rank0, gather_rows, peak_memory_mib, shard_batches, world
from .normal_images import normal_images_of
from .precision import full_precision
from .torch_model import AnomalousPatchCoreModel

logger = logging.getLogger(__name__)

_T = TypeVar("_T")


def build_memory_bank_on_all_ranks(
    model: AnomalousPatchCoreModel,
    normal_images: DataLoader,
    transform: nn.Module | None,
    sampling_ratio: float,
    seed: int | None,
    device: torch.device,
    between_batches: Callable[[], None],
    reestimate_batchnorm: bool = False,
) -> None:
    """Embed ``normal_images`` (this rank's share) and fill ``model.memory_bank`` with the common coreset.

    Args:
        model: The network, in eval mode; its memory bank is replaced.
        normal_images: The real normal training images (the model/data contract's dataloader).
        transform: The pre-processor's transform applied to each raw batch, if any.
        sampling_ratio: Fraction of the normal patches kept.
        seed: Seed of the coreset selection.
        device: Where the embedding runs.
        between_batches: Called after each batch and after the coreset (a SIGTERM check).
        reestimate_batchnorm: First re-estimate the encoder's batch-norm statistics on all of
            ``normal_images`` (see :mod:`.batchnorm`); every rank does the same pass.
    """
    rank, world_size = world()
    loader = shard_batches(normal_images, rank, world_size) if world_size > 1 else normal_images
    model.to(memory_format=torch.contiguous_format)
    embeddings = []
    with full_precision(device):
        if reestimate_batchnorm:
            batches = progress(normal_images_of(normal_images), "Re-estimating batch-norm statistics", rank)
            reestimate_batchnorm_statistics(model.feature_extractor, batches, transform, device)
        for images in progress(normal_images_of(loader), "Embedding normal training images", rank):
            images = images.to(device)
            embeddings.append(model.patch_embeddings(transform(images) if transform else images))
            between_batches()
        select = partial(_select_coreset, model, gather_rows(concatenate_releasing(embeddings, device=device)),
                         sampling_ratio, seed)
        model.memory_bank = broadcast_from_rank0(select, device=device, dtype=torch.float32)
        del select  # the gathered patches, several GB at real sizes
    if world_size > 1:
        logger.info("Memory bank of %d rows on each of %d ranks; rank %d peak memory %.0f MiB.",
                    len(model.memory_bank), world_size, rank, peak_memory_mib(device))
    between_batches()


def progress(batches: Iterable[_T], description: str, rank: int) -> Iterable[_T]:
    """``batches`` with a progress bar on rank 0 only: under DDP the other ranks would draw the same bar again."""
    return tqdm(batches, desc=description, unit="batch", disable=rank != 0)


def _select_coreset(
    model: AnomalousPatchCoreModel, memory: torch.Tensor, sampling_ratio: float, seed: int | None
) -> torch.Tensor:
    """The coreset of all normal patches (on rank 0 under DDP), as the model's memory bank."""
    logger.info("Selecting a %.1f %% coreset of %d normal patches.", 100 * sampling_ratio, len(memory))
    model.build_memory_bank(memory, sampling_ratio, seed=seed)
    return model.memory_bank


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
