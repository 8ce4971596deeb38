"""Greedy k-center selection chunk by chunk: memory banks of a million patches in minutes on two cores.

The exact greedy (anomalib's, and :class:`~.exact.FastKCenterGreedy`) reads the whole projected
patch matrix once per pick: ``n`` rows times ``k = ratio * n`` picks, bound by memory bandwidth.
At 1M x 1,536 and 10 % that is 100,000 passes over ~1.2 GB, hours on this kind of machine.

:class:`ChunkedKCenterGreedy` walks the rows in contiguous chunks of ``chunk_rows``. Each chunk
first learns how far each of its rows is from the bank picked so far (one blocked matrix product
against the earlier picks), then runs the greedy inside the chunk for its share of the picks (in
proportion to its rows; the total is anomalib's ``int(n * ratio)``), starting from its row farthest
from the bank. A pick therefore never repeats what earlier chunks already cover, and each greedy
step reads only the chunk (16,384 x 128 float32, 8 MiB: the processor's cache) instead of the whole
matrix. The work is ``n * k / 2`` distances for the products, which run at matrix-multiply speed,
plus ``k * chunk_rows`` for the steps.

What it gives up, measured in ``benchmarks/chunked_coreset_benchmark.py`` and ``docs/coreset.md``:
a chunk's share of the picks is fixed in advance, so a chunk with more novel content than its share
stays coarser than the global greedy would leave it, and rows of early chunks are never revisited
for later picks' sake. Only the first chunk's first pick is random (from ``seed``).

Under DDP the products, the bulk of the work, are shared: each chunk's rows are cut into fixed
blocks, every rank computes a contiguous run of blocks and the ranks exchange the results (a
:class:`BlockShare`), so every rank runs the same greedy steps on the same numbers and the bank is
the one a single process selects.

Distances are computed as ``|x|^2 - 2 x.c + |c|^2`` on a Gaussian random projection to
``projection_dim`` dimensions; its rounding differs from the direct difference, which only matters
to the exact sampler, whose indices must be anomalib's.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from .threads import single_threaded_torch_ops

DEFAULT_CHUNK_ROWS = 16_384
"""Rows per chunk: 8 MiB of 128-d float32, in cache for all the chunk's greedy steps. Here (32 MiB L3)
a step took 0.45 ms at 16,384 rows, 0.87 ms at 32,768 and 4.6 ms at 65,536 (out of cache)."""

PROJECTION_BLOCK_ROWS = 65_536
"""Rows projected per matrix product: a block of the (possibly memory-mapped) patch matrix at a time."""

DISTANCE_BLOCK_ROWS = 4_096
"""Chunk rows per block of the distance-to-bank product: the unit of work shared among DDP ranks."""

BANK_BLOCK_ROWS = 8_192
"""Bank rows per product: a 4,096 x 8,192 float32 block of distances (128 MiB) at a time."""


@dataclass(frozen=True)
class Chunk:
    """Rows ``start:stop`` of the patch matrix, from which ``picks`` centres are chosen."""

    start: int
    stop: int
    picks: int


class ChunkedKCenterGreedy:
    """Greedy k-center coreset selection chunk by chunk, each chunk aware of the bank picked before it.

    Args:
        sampling_ratio: Fraction of the rows kept, as anomalib's ``KCenterGreedy``.
        chunk_rows: Rows per chunk (the last one may be shorter). Larger chunks are closer to the
            exact greedy; steps slow down once a chunk no longer fits the cache.
        projection_dim: Dimensions of the Gaussian random projection the distances are computed in;
            features with no more dimensions than this are used as they are.
        seed: Seed of the projection and of the first pick (later chunks start from their row farthest
            from the bank). ``None`` draws one from torch's global generator when the sampler is made.

    Example:
        >>> embedding = torch.randn(50_000, 384)
        >>> coreset = ChunkedKCenterGreedy(sampling_ratio=0.01, seed=0).sample_coreset(embedding)
        >>> coreset.shape
        torch.Size([500, 384])
    """

    def __init__(
        self,
        sampling_ratio: float,
        *,
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
        projection_dim: int = 128,
        seed: int | None = 0,
    ) -> None:
        if chunk_rows <= 0 or projection_dim <= 0:
            msg = f"chunk_rows and projection_dim must be positive, got {chunk_rows} and {projection_dim}."
            raise ValueError(msg)
        self.sampling_ratio = sampling_ratio
        self.chunk_rows = chunk_rows
        self.projection_dim = projection_dim
        self.seed = int(torch.randint(2**62, ())) if seed is None else seed

    def chunks(self, total_rows: int) -> list[Chunk]:
        """The chunks of a matrix of ``total_rows`` rows, with their shares of ``int(total_rows * ratio)`` picks."""
        picks = int(total_rows * self.sampling_ratio)
        starts = range(0, total_rows, self.chunk_rows)
        return [
            Chunk(start, stop, picks * stop // total_rows - picks * start // total_rows)
            for start in starts
            for stop in [min(start + self.chunk_rows, total_rows)]
        ]

    def project(self, embedding: torch.Tensor) -> torch.Tensor:
        """``embedding`` (n, d) on the seeded Gaussian projection, float32, block by block.

        Reading the rows a block at a time keeps a memory-mapped matrix from being read in whole and
        allocates nothing but the projected result.
        """
        rows, width = embedding.shape
        if width <= self.projection_dim:
            return embedding.float()
        generator = torch.Generator().manual_seed(self.seed)
        matrix = torch.randn(width, self.projection_dim, generator=generator) / math.sqrt(self.projection_dim)
        matrix = matrix.to(embedding.device)
        projected = torch.empty((rows, self.projection_dim), device=embedding.device)
        for start in range(0, rows, PROJECTION_BLOCK_ROWS):
            block = embedding[start : start + PROJECTION_BLOCK_ROWS]
            torch.matmul(block.float(), matrix, out=projected[start : start + PROJECTION_BLOCK_ROWS])
        return projected

    def select_indices(self, projected: torch.Tensor, share: "BlockShare | None" = None) -> torch.Tensor:
        """Indices of the selected rows of the ``projected`` matrix, in chunk order and selection order.

        Args:
            projected: The rows in the space distances are measured in (:meth:`project`'s output).
            share: How the blocks of each chunk's product are shared out; all in this process by default.
        """
        share = share or LocalBlocks()
        chunks = self.chunks(len(projected))
        bank = projected.new_empty((sum(chunk.picks for chunk in chunks), projected.shape[1]))
        chosen = []
        filled = 0
        for number, chunk in enumerate(chunks):
            rows = projected[chunk.start : chunk.stop]
            nearest = _nearest_bank_distances(rows, bank[:filled], share)
            picks = self._greedy_in_chunk(rows, nearest, number, chunk.picks)
            bank[filled : filled + len(picks)] = rows[picks]
            filled += len(picks)
            chosen.append(picks + chunk.start)
        return torch.cat(chosen) if chosen else torch.empty(0, dtype=torch.long)

    def select_coreset_idxs(self, embedding: torch.Tensor) -> torch.Tensor:
        """Indices of the selected rows of ``embedding``, in chunk order."""
        return self.select_indices(self.project(embedding))

    def sample_coreset(self, embedding: torch.Tensor) -> torch.Tensor:
        """The selected rows of ``embedding`` (a copy, in memory, even when ``embedding`` is memory-mapped)."""
        return embedding[self.select_coreset_idxs(embedding).to(embedding.device)]

    @torch.no_grad()
    def _greedy_in_chunk(self, rows: torch.Tensor, nearest: torch.Tensor, number: int, picks: int) -> torch.Tensor:
        """``picks`` greedy k-center picks among ``rows``, given each row's squared distance to the bank so far.

        Starts from the row farthest from the bank, or, before any pick, from a row drawn under ``seed``.
        Runs on one thread: the steps are sequential and each reads 8 MiB, already in cache.
        """
        if picks == 0:
            return torch.empty(0, dtype=torch.long)
        squared_norms = rows.square().sum(dim=1)
        distances = torch.empty_like(squared_norms)
        if torch.isinf(nearest).all():
            seed = int(np.random.SeedSequence([self.seed, number]).generate_state(1)[0])
            center = int(torch.randint(len(rows), (1,), generator=torch.Generator().manual_seed(seed)))
        else:
            center = int(torch.argmax(nearest))
        chosen = []
        with single_threaded_torch_ops():
            for _ in range(picks):
                chosen.append(center)
                torch.addmv(squared_norms, rows, rows[center], alpha=-2, out=distances)
                distances += squared_norms[center]
                torch.minimum(nearest, distances, out=nearest)
                nearest[center] = 0
                center = int(torch.argmax(nearest))
        return torch.tensor(chosen, dtype=torch.long, device=rows.device)


class BlockShare(Protocol):
    """Computes the blocks of one chunk's product, possibly spread over processes; every caller gets all of them."""

    def concatenated_blocks(self, count: int, compute: Callable[[int], torch.Tensor]) -> torch.Tensor:
        """``compute(0), ..., compute(count - 1)`` concatenated, each block computed by exactly one participant."""
        ...


class LocalBlocks:
    """Every block computed in this process."""

    def concatenated_blocks(self, count: int, compute: Callable[[int], torch.Tensor]) -> torch.Tensor:
        """``compute(0), ..., compute(count - 1)`` concatenated."""
        return torch.cat([compute(block) for block in range(count)])


@torch.no_grad()
def _nearest_bank_distances(rows: torch.Tensor, bank: torch.Tensor, share: BlockShare) -> torch.Tensor:
    """Squared distance of each of ``rows`` to its nearest row of ``bank`` (+inf for an empty bank).

    Rows go in blocks of :data:`DISTANCE_BLOCK_ROWS` (the unit shared out under DDP, with the same
    shapes whoever computes it, so the same rounding) against bank blocks of :data:`BANK_BLOCK_ROWS`,
    so the largest temporary is one block's distances, 128 MiB.
    """
    if len(bank) == 0:
        return torch.full((len(rows),), float("inf"), device=rows.device)
    bank_norms = bank.square().sum(dim=1)

    def block_distances(block: int) -> torch.Tensor:
        part = rows[block * DISTANCE_BLOCK_ROWS : (block + 1) * DISTANCE_BLOCK_ROWS]
        nearest = torch.full((len(part),), float("inf"), device=rows.device)
        for start in range(0, len(bank), BANK_BLOCK_ROWS):
            stop = start + BANK_BLOCK_ROWS
            products = torch.addmm(bank_norms[None, start:stop], part, bank[start:stop].T, alpha=-2)
            torch.minimum(nearest, products.amin(dim=1), out=nearest)
        return nearest + part.square().sum(dim=1)

    count = -(-len(rows) // DISTANCE_BLOCK_ROWS)
    return share.concatenated_blocks(count, block_distances)
