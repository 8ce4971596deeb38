"""Phase 2: PatchCore's memory bank from the real normal training images, on one device or several.

Under DDP each rank embeds its contiguous share of the normal images, rank 0 gathers the patches in the
single-process order and selects the coreset (the chunked sampler shares its chunks among the ranks), then
broadcasts it (see :mod:`.distributed`), so every rank holds the memory bank one process would build. The
patches wait in memory or in a memory-mapped file (see :mod:`anomalib_apc.sampling`). Everything runs in
float32 and the standard memory layout (see :mod:`.precision`): the bank, the coreset and the scores are then
those of a model loaded from the checkpoint in a fresh process.

With ``reestimate_batchnorm`` the encoder's batch-norm running statistics are first re-estimated on the
normal training images (:func:`reestimate_batchnorm_statistics`). Fine-tuning sees balanced batches, half
of them anomalous or CutPaste, so its running means and variances describe that mixture rather than the
normal images the memory bank is built from and the mostly normal test images; re-estimated, the memory
bank and the test see the same normalisation, and no weight changes. PyTorch's
``torch.optim.swa_utils.update_bn`` does the pass (statistics reset, cumulative average over one pass,
modes restored).
"""

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

import torch
from torch import nn
from torch.optim.swa_utils import update_bn
from torch.utils.data import DataLoader
from tqdm import tqdm

from anomalib_apc.errors import InvalidInputError
from anomalib_apc.sampling import (
    DEFAULT_CHUNK_ROWS,
    ChunkedKCenterGreedy,
    PatchRowCollector,
    allocate_rows,
    check_coreset_sampler,
    check_patch_storage,
    resolve_coreset_sampler,
    sample_coreset,
)

from .distributed import (
    RankBlocks,
    broadcast_from_rank0,
    gather_rows,
    peak_memory_mib,
    shard_batches,
    summed_over_ranks,
    world,
)
from .encoder import TimmEncoder
from .normal_images import normal_images_of
from .precision import full_precision
from .torch_model import AnomalousPatchCoreModel

logger = logging.getLogger(__name__)

_T = TypeVar("_T")


@dataclass(frozen=True)
class CoresetOptions:
    """How phase 2 turns the normal patches into the memory bank (the model's constructor arguments).

    Attributes:
        sampling_ratio: Fraction of the normal patches kept.
        seed: Seed of the coreset selection.
        sampler: ``"exact"``, ``"chunked"`` or ``"auto"`` (see :mod:`anomalib_apc.sampling.selection`).
        patch_storage: Where the patches wait: ``"memory"``, ``"disk"`` or ``"auto"``
            (see :mod:`anomalib_apc.sampling.storage`).
        chunk_rows: Rows per chunk of the chunked sampler.
    """

    sampling_ratio: float
    seed: int | None
    sampler: str = "auto"
    patch_storage: str = "auto"
    chunk_rows: int = DEFAULT_CHUNK_ROWS

    def __post_init__(self) -> None:
        """Refuse unknown sampler or storage names and non-positive chunks when the model is made.

        Raises:
            InvalidInputError: The message names the argument and what it accepts.
        """
        check_coreset_sampler(self.sampler)
        check_patch_storage(self.patch_storage)
        if self.chunk_rows <= 0:
            msg = f"coreset_chunk_rows must be a positive number of rows, got {self.chunk_rows}."
            raise InvalidInputError(msg)


def build_memory_bank_on_all_ranks(
    model: AnomalousPatchCoreModel,
    normal_images: DataLoader,
    transform: nn.Module | None,
    coreset: CoresetOptions,
    device: torch.device,
    between_batches: Callable[[], None],
    reestimate_batchnorm: bool = False,
) -> None:
    """Embed ``normal_images`` (this rank's share) and fill ``model.memory_bank`` with the common coreset.

    Args:
        model: The network, in eval mode; its memory bank is replaced.
        normal_images: The real normal training images (the model/data contract's dataloader).
        transform: The pre-processor's transform applied to each raw batch, if any.
        coreset: Ratio, seed, sampler and patch storage of the selection.
        device: Where the embedding runs.
        between_batches: Called after each batch and after the coreset (a SIGTERM check).
        reestimate_batchnorm: First re-estimate the encoder's batch-norm statistics on all of
            ``normal_images`` (see the module docstring); every rank does the same pass.
    """
    rank, world_size = world()
    loader = shard_batches(normal_images, rank, world_size) if world_size > 1 else normal_images
    model.to(memory_format=torch.contiguous_format)
    dataset = getattr(normal_images, "dataset", None)  # a plain iterable of batches has none to count
    collector = PatchRowCollector(coreset.patch_storage, expected_images=None if dataset is None else len(dataset))
    with full_precision(device):
        if reestimate_batchnorm:
            batches = progress(normal_images_of(normal_images), "Re-estimating batch-norm statistics", rank)
            reestimate_batchnorm_statistics(model.feature_extractor, batches, transform, device)
        for images in progress(normal_images_of(loader), "Embedding normal training images", rank):
            images = images.to(device)
            collector.add(model.patch_embeddings(transform(images) if transform else images), images=len(images))
            between_batches()
        model.memory_bank = _select_on_all_ranks(model, collector, coreset, device)
    if world_size > 1:
        logger.info("Memory bank of %d rows on each of %d ranks; rank %d peak memory %.0f MiB.",
                    len(model.memory_bank), world_size, rank, peak_memory_mib(device))
    between_batches()


def progress(batches: Iterable[_T], description: str, rank: int) -> Iterable[_T]:
    """``batches`` with a progress bar on rank 0 only: under DDP the other ranks would draw the same bar again."""
    return tqdm(batches, desc=description, unit="batch", disable=rank != 0)


def _select_on_all_ranks(
    model: AnomalousPatchCoreModel, collector: PatchRowCollector, coreset: CoresetOptions, device: torch.device
) -> torch.Tensor:
    """The memory bank every rank gets: the coreset of all ranks' patches, gathered on rank 0 in rank order.

    The exact greedy runs on rank 0 alone. The chunked one shares its distance products: rank 0
    projects the patches and sends the projection to every rank, the ranks split each chunk's
    products and exchange them (:class:`.distributed.RankBlocks`), so all take the greedy steps one
    process would take.
    """
    local = collector.rows()
    world_size = world()[1]
    total_rows = summed_over_ranks(len(local), device)
    model.check_normal_patches(total_rows, coreset.sampling_ratio)
    allocate = partial(allocate_rows, device=local.device, storage=coreset.patch_storage)
    patches = gather_rows(local, allocate=allocate)
    del local
    logger.info("Selecting a %.1f %% coreset of %d normal patches.", 100 * coreset.sampling_ratio, total_rows)
    chosen = resolve_coreset_sampler(coreset.sampler, total_rows, coreset.sampling_ratio)
    if chosen == "exact" or world_size == 1:
        def select() -> torch.Tensor:
            return sample_coreset(patches, coreset.sampling_ratio, coreset.seed, chosen, coreset.chunk_rows).to(device)
    else:
        sampler = ChunkedKCenterGreedy(coreset.sampling_ratio, chunk_rows=coreset.chunk_rows, seed=coreset.seed)
        projected = broadcast_from_rank0(lambda: sampler.project(patches).to(device), device, torch.float32)
        indices = sampler.select_indices(projected, share=RankBlocks())  # the same indices on every rank
        del projected

        def select() -> torch.Tensor:
            return patches[indices.to(patches.device)].to(device)

    return broadcast_from_rank0(select, device=device, dtype=torch.float32)


class _AllStages(nn.Module):
    """The encoder through every stage, so that every batch-norm layer sees data during ``update_bn``.

    The memory bank only reads the stages up to its deepest layer, but the decoder and the
    segmentation head (``segmentation_fusion``) read the deeper ones too: ``update_bn`` resets every
    batch-norm layer of the module it is given, so each must be reached by the pass.
    """

    def __init__(self, encoder: TimmEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.encoder.forward_all_stages(images)


def reestimate_batchnorm_statistics(
    encoder: TimmEncoder,
    images: Iterable[torch.Tensor],
    transform: nn.Module | None,
    device: torch.device,
) -> None:
    """Replace the running statistics of every batch-norm layer of ``encoder`` by those of ``images``.

    Args:
        encoder: The fine-tuned encoder; its train/eval mode is kept.
        images: Raw batches of the real normal training images (all of them, on every DDP rank, so
            that every rank computes the same statistics without communicating).
        transform: The pre-processor's transform applied to each raw batch, if any.
        device: Where the pass runs.
    """

    def prepared() -> Iterator[torch.Tensor]:
        for batch in images:
            batch = batch.to(device)
            yield transform(batch) if transform else batch

    all_stages = _AllStages(encoder)
    all_stages.train(encoder.training)  # update_bn restores the mode of the module it is given
    update_bn(prepared(), all_stages)
