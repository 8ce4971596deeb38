"""Phase 2 across processes: each rank embeds a share of the normal images, rank 0 builds the one memory bank.

Under Lightning's DDP every process runs phase 2. :func:`shard_batches` gives each rank a contiguous
run of the single-process batches (same batch boundaries, so every image is embedded exactly as one
process would embed it); :func:`gather_rows` collects the ranks' patch rows on rank 0 in rank order,
which is then the single-process concatenation order; :func:`broadcast_from_rank0` runs the coreset
selection there once and sends the result to every rank, so every rank, and the checkpoint that rank
0 writes, holds the same complete memory bank.

Plain ``torch.distributed`` (no Lightning), so it works with any backend Lightning set up (gloo on the
CPU, NCCL on GPUs). Outside a process group every function degrades to the single-process case.
"""

import logging
import math
import sys
from collections.abc import Callable

import torch
from torch import distributed as dist
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler

from anomalib_apc.errors import ApcError

logger = logging.getLogger(__name__)


class RankFailedError(ApcError, RuntimeError):
    """Rank 0 failed while the other ranks waited for its result (its own error is raised there)."""


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of this process; ``(0, 1)`` without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def step_without_update(device: torch.device) -> dict[str, torch.Tensor] | None:
    """The output of a training step that updates no weight: nothing, or under DDP a constant loss.

    Lightning refuses a ``None`` step output under DDP; a constant with no path to any parameter
    (anomalib's PatchCore returns one too) lets the pass run and the step be counted, so the
    checkpoint is written, without any gradient or all-reduce.
    """
    if world()[1] == 1:
        return None
    return {"loss": torch.zeros((), device=device, requires_grad=True)}


def contiguous_share(count: int, rank: int, world_size: int) -> range:
    """The ``rank``-th of ``world_size`` contiguous, non-overlapping parts of ``range(count)``, sizes within one."""
    return range(count * rank // world_size, count * (rank + 1) // world_size)


def shard_batches(loader: DataLoader, rank: int, world_size: int) -> DataLoader:
    """A loader over this rank's contiguous share of the sequential batches of ``loader``'s dataset.

    The batches are those of one process reading ``loader.dataset`` in order with ``loader.batch_size``;
    rank ``r`` reads the ``r``-th contiguous run of them, so the ranks' batches in rank order are the
    single-process batches. A loader that shuffles is read in dataset order instead (said in the log).
    """
    if not isinstance(loader.sampler, SequentialSampler):
        logger.info("The normal training images are read in dataset order on %d ranks (the loader shuffles).",
                    world_size)
    batch_size = loader.batch_size or 1
    batches = list(BatchSampler(SequentialSampler(range(len(loader.dataset))), batch_size, drop_last=False))
    mine = [batches[index] for index in contiguous_share(len(batches), rank, world_size)]
    return DataLoader(loader.dataset, batch_sampler=mine, num_workers=loader.num_workers,
                      collate_fn=loader.collate_fn, pin_memory=loader.pin_memory)


def gather_rows(
    rows: torch.Tensor, allocate: Callable[[tuple[int, int], torch.dtype], torch.Tensor] | None = None
) -> torch.Tensor | None:
    """Rank 0 gets every rank's 2-D ``rows`` (row counts may differ, even be 0) stacked in rank order.

    The row counts and widths are gathered first, then rank 0 receives each rank's rows straight into
    its part of the result: it holds the result and its own rows, never a padded copy. Other ranks get ``None``.

    Args:
        rows: This rank's rows.
        allocate: Makes rank 0's result from its shape and dtype (a memory-mapped one, for instance);
            by default an empty tensor beside ``rows``.
    """
    rank, world_size = world()
    if world_size == 1:
        return rows
    shape = torch.tensor([rows.shape[0], rows.shape[1] if rows.ndim == 2 else 0], dtype=torch.long, device=rows.device)
    shapes = [torch.zeros_like(shape) for _ in range(world_size)]
    dist.all_gather(shapes, shape)
    if rank != 0:
        if rows.shape[0]:
            dist.send(rows.contiguous(), dst=0)
        return None
    sizes = [int(size) for size, _ in shapes]
    shape = (sum(sizes), max(int(width) for _, width in shapes))
    result = rows.new_empty(shape) if allocate is None else allocate(shape, rows.dtype)
    if sizes[0]:
        result[: sizes[0]] = rows
    offset = sizes[0]
    for source, size in enumerate(sizes[1:], start=1):
        if size:
            dist.recv(result[offset : offset + size], src=source)
        offset += size
    return result


def summed_over_ranks(count: int, device: torch.device) -> int:
    """The sum of every rank's ``count`` (``count`` itself in one process)."""
    if world()[1] == 1:
        return count
    total = torch.tensor([count], dtype=torch.long, device=device)
    dist.all_reduce(total)
    return int(total)


class RankBlocks:
    """The chunked coreset's distance blocks shared out: each rank computes a contiguous run, all get all.

    Every rank ends with the same numbers (each block computed once, with the same shapes wherever),
    so every rank then takes the same greedy steps: the bank of one process, its products split W ways.
    """

    def concatenated_blocks(self, count: int, compute: Callable[[int], torch.Tensor]) -> torch.Tensor:
        """``compute(0), ..., compute(count - 1)`` concatenated, on every rank."""
        rank, world_size = world()
        if world_size == 1:
            return torch.cat([compute(block) for block in range(count)])
        mine = [compute(block) for block in contiguous_share(count, rank, world_size)]
        local = torch.cat(mine) if mine else None
        size = torch.tensor([0 if local is None else len(local)], dtype=torch.long, device=_device_of(mine))
        sizes = [torch.zeros_like(size) for _ in range(world_size)]
        dist.all_gather(sizes, size)
        result = torch.empty(int(sum(sizes)), device=size.device)
        offset = 0
        for source, source_size in enumerate(int(part) for part in sizes):
            part = result[offset : offset + source_size]
            if source == rank and local is not None:
                part.copy_(local)
            dist.broadcast(part, src=source)
            offset += source_size
        return result


def _device_of(tensors: list[torch.Tensor]) -> torch.device:
    """Where the tensors are; the current CUDA device under NCCL when this rank has none, else the CPU."""
    if tensors:
        return tensors[0].device
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def broadcast_from_rank0(compute: Callable[[], torch.Tensor], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Run ``compute`` on rank 0 only and give its 2-D result to every rank.

    When ``compute`` raises on rank 0 the other ranks raise :class:`RankFailedError` instead of waiting forever.
    """
    rank, world_size = world()
    if world_size == 1:
        return compute()
    shape = torch.tensor([-1, -1], dtype=torch.long, device=device)
    result = None
    try:
        if rank == 0:
            result = compute()
            shape = torch.tensor(result.shape, dtype=torch.long, device=device)
    finally:
        dist.broadcast(shape, src=0)
    rows, width = (int(size) for size in shape)
    if rows < 0:
        msg = "Rank 0 failed to build the memory bank; its error is in its log."
        raise RankFailedError(msg)
    if result is None:
        result = torch.empty((rows, width), dtype=dtype, device=device)
    dist.broadcast(result, src=0)
    return result


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory so far: allocated CUDA memory on a GPU, resident set size otherwise (NaN on Windows)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource  # POSIX only: imported here so that the package imports on Windows, which anomalib supports
    except ImportError:
        return math.nan
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10
