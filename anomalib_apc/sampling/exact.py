"""k-center-greedy coreset selection that returns exactly anomalib's indices, several times faster.

anomalib's ``KCenterGreedy`` spends nearly all its time in ``update_distances``: every greedy step
computes ``torch.linalg.norm(features - center, dim=1)`` and ``torch.minimum``, which allocate an
n x d difference tensor and two n x 1 tensors. At 500k patches projected to 324 dimensions that is
~0.65 GB of fresh memory per step, written out to main memory, read back, and paid for again in
page faults.

``FastKCenterGreedy`` keeps anomalib's projection, random start and loop and replaces only that
update: rows are processed in cache-sized chunks through preallocated buffers and the running
minimum is updated in place. The arithmetic is the parent's (subtraction, ``vector_norm`` over each
row, ``minimum``) and a row's norm does not depend on which other rows are reduced with it, so the
distances are bit-identical to anomalib's and so are the chosen indices, ties included.

On CPU the chunks are shared out dynamically to ``torch.get_num_threads()`` Python threads running
single-threaded torch kernels, instead of letting each small kernel open its own OpenMP region: with
other processes on the cores, hundreds of OpenMP barriers per step made the chunked update slower
than anomalib's, while idle threads here simply take the chunks a descheduled one did not get.

Why not the expansion ``||x||^2 - 2 x.c + ||c||^2`` with ``addmv``: its rounding differs from the
direct difference, so near-ties can flip and the indices would no longer be anomalib's; and it is
not faster on CPU: ``mv`` runs on one thread and took 124 ms per step at 500k x 324 for the product
alone, about twice the whole chunked update.

The projection is anomalib's ``SparseRandomProjection`` unchanged (the parent's ``self.model``).
At 500k x 1536 its ``fit`` takes ~0.2 s and ``transform`` ~6 s, a few percent of the loop at a 1 %
coreset, and its only allocation is the projected output (``.T`` is a view and ``.type()`` a no-op
for float32); a sparse product is 3x slower on CPU and rounds differently, so there was nothing to
gain without changing the features.
"""

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager

import numpy as np
import torch
from anomalib.models.components.sampling import KCenterGreedy

from .threads import WorkDispenser, single_threaded_torch_ops

CPU_CHUNK_BYTES = 2 * 1024 * 1024
"""Size of each thread's difference buffer on CPU. Small enough that the rows the subtraction writes
are still in cache when the norm reads them back, large enough that the per-chunk Python and
dispatch overhead stays small: on 2 EPYC cores at 500k x 324, best of three, a step took 55-66 ms
with 2-4 MiB chunks, 76 ms with 1 MiB, 84 ms with 16 MiB, 97 ms with 0.5 MiB (anomalib: 390 ms+)."""


@contextmanager
def seeded_global_rngs(seed: int | None) -> Iterator[None]:
    """Seed torch's and numpy's global generators for the block, then restore them.

    anomalib draws the projection's non-zero counts and signs and the random first center from
    torch's generators, but the projection's column indices from numpy's global generator
    (``sample_without_replacement`` with ``random_state=None``), so a reproducible coreset needs
    both. Restoring them afterwards leaves the caller's random streams undisturbed. The CPU and
    every CUDA generator are restored because ``torch.manual_seed`` reseeds all of them.

    Args:
        seed: Seed for both generators; ``None`` leaves the global generators in use as they are.
    """
    if seed is None:
        yield
        return
    numpy_state = np.random.get_state()
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()), device_type="cuda"):
        torch.manual_seed(seed)
        np.random.seed(seed)
        try:
            yield
        finally:
            np.random.set_state(numpy_state)


class FastKCenterGreedy(KCenterGreedy):
    """anomalib's ``KCenterGreedy`` with an allocation-free, cache-sized, multi-threaded update.

    Selects the same indices as ``KCenterGreedy`` given the same global random state; with
    ``seed``, the same indices as ``KCenterGreedy`` run right after ``torch.manual_seed(seed)`` and
    ``np.random.seed(seed)``, without changing the global generators.

    Args:
        embedding: Patch features, ``(n, d)``; a tensor with more dimensions is flattened per
            sample and not projected, as in the parent.
        sampling_ratio: Fraction of the samples to keep.
        chunk_size: Rows per distance-update chunk. ``None`` picks ``CPU_CHUNK_BYTES`` worth of
            rows on CPU and all rows on other devices, where kernel launches, not cache, are the
            limit and a single chunk keeps anomalib's reduction layout.
        seed: Seed of the projection and of the first center; ``None`` uses the global generators
            like the parent.

    Example:
        >>> embedding = torch.randn(10_000, 1536)
        >>> coreset = FastKCenterGreedy(embedding, sampling_ratio=0.01, seed=0).sample_coreset()
        >>> coreset.shape
        torch.Size([100, 1536])
    """

    def __init__(
        self,
        embedding: torch.Tensor,
        sampling_ratio: float,
        *,
        chunk_size: int | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__(embedding=embedding, sampling_ratio=sampling_ratio)
        if chunk_size is not None and chunk_size <= 0:
            msg = f"chunk_size must be a positive integer or None, got {chunk_size}."
            raise ValueError(msg)
        self.chunk_size = chunk_size
        self.seed = seed
        self._scratch: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._helpers: ThreadPoolExecutor | None = None

    def select_coreset_idxs(self) -> list[int]:
        """Run the parent's projection and greedy loop under ``seed``, with the fast update.

        Returns:
            Indices of the selected samples, in selection order.
        """
        with seeded_global_rngs(self.seed):
            try:
                return super().select_coreset_idxs()
            finally:
                self._release_scratch()

    @torch.no_grad()
    def update_distances(self, cluster_center: int | torch.Tensor | None) -> None:
        """Lower each sample's distance to its nearest center by its distance to ``cluster_center``.

        Same result, bit for bit, as the parent's update; the minimum starts at +inf instead of
        being the first center's distances, which is the same thing. No gradient is recorded:
        only the indices leave this class.

        Args:
            cluster_center: Index of one center (int, 0-d tensor or 1-element tensor); ``None``
                does nothing, as in the parent.
        """
        if cluster_center is None:
            return
        if self.min_distances is None:
            self.min_distances = torch.full(
                (self.n_observations, 1), float("inf"), dtype=self.features.dtype, device=self.features.device
            )
        if not self._scratch:
            self._allocate_scratch()
        center = self.features[cluster_center].squeeze()
        chunk_starts = WorkDispenser(range(0, self.n_observations, self._scratch[0][0].shape[0]))
        if self._helpers is None:
            self._update_chunks(center, chunk_starts, *self._scratch[0])
            return
        with single_threaded_torch_ops():
            helpers = [
                self._helpers.submit(self._update_chunks, center, chunk_starts, *scratch)
                for scratch in self._scratch[1:]
            ]
            try:
                self._update_chunks(center, chunk_starts, *self._scratch[0])
            finally:
                wait(helpers)
        for helper in helpers:
            helper.result()

    def _update_chunks(
        self,
        center: torch.Tensor,
        chunk_starts: Iterator[int],
        difference_buffer: torch.Tensor,
        distance_buffer: torch.Tensor,
    ) -> None:
        """Update the running minimum for every chunk this thread takes from ``chunk_starts``."""
        chunk_rows = difference_buffer.shape[0]
        for start in chunk_starts:
            stop = min(start + chunk_rows, self.n_observations)
            difference = difference_buffer[: stop - start]
            distance = distance_buffer[: stop - start]
            nearest = self.min_distances[start:stop]
            torch.sub(self.features[start:stop], center, out=difference)
            torch.linalg.vector_norm(difference, ord=2, dim=1, keepdim=True, out=distance)
            torch.minimum(nearest, distance, out=nearest)

    def _allocate_scratch(self) -> None:
        """Create one pair of chunk buffers per thread and the helper threads, once per selection."""
        on_cpu = self.features.device.type == "cpu"
        threads = torch.get_num_threads() if on_cpu else 1
        if self.chunk_size is not None:
            rows = self.chunk_size
        elif on_cpu:
            rows = CPU_CHUNK_BYTES // (self.features.shape[1] * self.features.element_size())
        else:
            rows = self.n_observations
        rows = max(1, min(rows, self.n_observations))
        options = {"dtype": self.features.dtype, "device": self.features.device}
        self._scratch = [
            (torch.empty((rows, self.features.shape[1]), **options), torch.empty((rows, 1), **options))
            for _ in range(threads)
        ]
        if threads > 1:
            self._helpers = ThreadPoolExecutor(max_workers=threads - 1, thread_name_prefix="k-center-greedy")

    def _release_scratch(self) -> None:
        """Free the chunk buffers and stop the helper threads once the selection is over."""
        if self._helpers is not None:
            self._helpers.shutdown()
            self._helpers = None
        self._scratch = []
