"""Nearest-neighbour search over the PatchCore memory bank with faiss.

The search is what makes PatchCore slow on a CPU: every patch of an image (1,024 at 256 px) is
compared with every memory-bank row (16,384 x 1,536 in anomalib's default), 26 G multiply-adds per
image where the CNN needs about 4 G. Three strategies share one contract (for each query row, the
id of a memory-bank row and the exact squared distance to it):

- ``BruteForceSearch``: faiss ``IndexFlatL2`` over every row, the reference.
- ``BoundedExactSearch`` (the default): the same answers with a fraction of the work. CNN features
  concentrate their variance in a few principal directions, so with ``a = x - mean`` and
  ``b = m - mean`` split into their part on those directions (``P``) and the rest (``R``),

      ||x - m||^2 = ||Pa - Pb||^2 + ||Ra - Rb||^2 >= ||Pa - Pb||^2 + (||Ra|| - ||Rb||)^2,

  a lower bound that is an ordinary squared distance between ``(d + 1)``-dimensional vectors
  ``[Pa, ||Ra||]``. A flat search in that small space gives each query the ``candidates`` rows with
  the smallest bounds; their exact distances give the nearest of them. The query is settled when
  the largest bound among the candidates exceeds that distance, as no other row can then be nearer;
  the queries left unsettled get a second round with 16 times the candidates, and those still
  unsettled the brute-force search. Results equal brute force (up to float
  rounding between rows at the same distance); only the time depends on the data.
- ``ApproximateSearch``: a compact approximate faiss index (HNSW, IVF, PCA) proposes candidates, whose exact
  distances are then taken, so a miss costs a larger score, never a smaller one.

This module is what the inferencer runs. Choosing, building and measuring these searches at export
(index recipes, timing of the bound, recall) is ``anomalib_apc.deploy.search_export``.
"""

from pathlib import Path
from typing import Protocol

import faiss
import numpy as np
import torch

# Float32 rounding of a squared distance computed as |x|^2 + |m|^2 - 2 x.m is a few ulps of the
# norms; a bound must beat the best exact distance by this fraction of them to settle a query.
BOUND_ROUNDING_MARGIN = 1e-5
# Candidates of the second round of the bounded search, as a multiple of the first round's.
WIDER_ROUND_FACTOR = 16


class NearestNeighbourSearch(Protocol):
    """For each query row: the id of its (approximately) nearest memory-bank row and the exact squared distance."""

    def nearest(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


def flat_index(rows: np.ndarray) -> faiss.IndexFlatL2:
    """An exact L2 index holding ``rows`` (faiss copies them)."""
    index = faiss.IndexFlatL2(rows.shape[1])
    index.add(np.ascontiguousarray(rows, dtype=np.float32))
    return index


def flat_vectors(index: faiss.IndexFlat) -> np.ndarray:
    """The rows stored in a flat index as a view, so the memory bank is not held twice.

    The view does not keep ``index`` alive (whoever holds it must hold the index too), and writing
    to it would change the index.
    """
    return faiss.rev_swig_ptr(index.get_xb(), index.ntotal * index.d).reshape(index.ntotal, index.d)


def exact_squared_distances(queries: np.ndarray, vectors: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """``||queries[i] - vectors[ids[i, j]]||^2`` computed from the differences, not from dot products."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    distances = np.empty(ids.shape, dtype=np.float32)
    faiss.fvec_L2sqr_by_idx(
        faiss.swig_ptr(distances), faiss.swig_ptr(queries), faiss.swig_ptr(vectors), faiss.swig_ptr(ids),
        queries.shape[1], ids.shape[0], ids.shape[1],
    )
    return distances


def nearest_candidate(queries: np.ndarray, vectors: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Among each query's candidate ids (``-1`` = none), the nearest one and its exact squared distance."""
    distances = exact_squared_distances(queries, vectors, np.maximum(ids, 0))
    distances[ids < 0] = np.inf
    best = distances.argmin(axis=1)
    rows = np.arange(len(ids))
    return distances[rows, best], ids[rows, best]


class BruteForceSearch:
    """Every query against every memory-bank row (faiss ``IndexFlatL2``)."""

    def __init__(self, memory_bank: faiss.IndexFlatL2) -> None:
        self.memory_bank = memory_bank
        self.vectors = flat_vectors(memory_bank)

    def nearest(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        _, ids = self.memory_bank.search(queries, 1)
        # faiss ranks by |x|^2 + |m|^2 - 2 x.m; the reported distance is recomputed from the difference.
        return nearest_candidate(queries, self.vectors, ids)


class BoundProjection:
    """Leading principal axes of the memory bank: the ``P`` of ``BoundedExactSearch``'s lower bound.

    The projection runs as a faiss ``LinearTransform`` rather than a numpy product: numpy's own
    OpenBLAS threads keep spinning after a call and starve faiss's OpenMP threads on a small CPU
    (a search took 8 ms instead of 0.5 ms on two cores), so the whole search stays on faiss's
    threads; this module calls no numpy BLAS routine.

    Args:
        mean: Mean memory-bank row, shape ``(D,)``.
        axes: Orthonormal columns ``(D, d)``, the directions of largest variance first.
        axis_variances: The memory bank's variance along each axis, ``(d,)``.
        total_variance: Its variance over all ``D`` dimensions.
    """

    def __init__(self, mean: np.ndarray, axes: np.ndarray, axis_variances: np.ndarray, total_variance: float) -> None:
        self.mean = np.ascontiguousarray(mean, dtype=np.float32)
        self.axes = np.ascontiguousarray(axes, dtype=np.float32)
        self.axis_variances = np.asarray(axis_variances, dtype=np.float64)
        self.total_variance = total_variance
        self._centred_projection = faiss.LinearTransform(self.axes.shape[0], self.axes.shape[1], True)
        faiss.copy_array_to_vector(np.ascontiguousarray(self.axes.T).ravel(), self._centred_projection.A)
        faiss.copy_array_to_vector(-np.einsum("i,ij->j", self.mean, self.axes), self._centred_projection.b)
        self._centred_projection.is_trained = True

    @classmethod
    def fit(cls, memory_bank: np.ndarray, max_dim: int) -> "BoundProjection":
        """The ``max_dim`` principal axes of the memory bank (fewer if it has fewer dimensions).

        Computed with torch, not numpy: numpy's OpenBLAS threads and faiss's OpenMP threads spinning
        side by side slowed a 256 x 384 product down to minutes on a busy two-core machine.
        """
        rows = torch.from_numpy(np.ascontiguousarray(memory_bank, dtype=np.float32))
        mean = rows.double().mean(dim=0)
        centred = rows - mean.float()
        # Any orthonormal axes give a valid bound; float64 only makes them the best ones.
        eigenvalues, eigenvectors = torch.linalg.eigh((centred.T @ centred).double())
        eigenvalues, eigenvectors = eigenvalues.flip(0).clamp(min=0), eigenvectors.flip(1)
        dim = min(max_dim, len(eigenvalues))
        return cls(mean.float().numpy(), eigenvectors[:, :dim].float().numpy(), eigenvalues[:dim].numpy(),
                   float(eigenvalues.sum()))

    @property
    def explained_variance(self) -> float:
        """Fraction of the memory bank's variance that the axes span."""
        return float(self.axis_variances.sum() / self.total_variance) if self.total_variance > 0 else 1.0

    @property
    def dim(self) -> int:
        return self.axes.shape[1]

    def bound_vectors(self, vectors: np.ndarray) -> np.ndarray:
        """``[P(v - mean), ||R(v - mean)||]`` per row, whose squared distances bound the true ones from below."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        head = self._centred_projection.apply(vectors)
        centred = vectors - self.mean
        tail_squared = np.einsum("ij,ij->i", centred, centred) - np.einsum("ij,ij->i", head, head)
        bounds = np.empty((len(vectors), self.dim + 1), dtype=np.float32)
        bounds[:, :-1] = head
        bounds[:, -1] = np.sqrt(tail_squared.clip(min=0))
        return bounds

    def save(self, path: Path) -> None:
        np.savez(path, mean=self.mean, axes=self.axes, axis_variances=self.axis_variances,
                 total_variance=self.total_variance)

    @classmethod
    def load(cls, path: Path) -> "BoundProjection":
        with np.load(path) as stored:
            return cls(stored["mean"], stored["axes"], stored["axis_variances"], float(stored["total_variance"]))


class BoundedExactSearch:
    """Exact nearest neighbours, settled by a lower bound for most queries (see the module docstring).

    Args:
        memory_bank: The exact flat index, also used for the queries the bound cannot settle.
        projection: The principal axes of the bound.
        candidates: Rows with the smallest bounds whose exact distances are taken per query.
    """

    def __init__(self, memory_bank: faiss.IndexFlatL2, projection: BoundProjection, candidates: int) -> None:
        self.brute_force = BruteForceSearch(memory_bank)
        self.vectors = self.brute_force.vectors
        self.projection = projection
        self.candidates = min(candidates, memory_bank.ntotal)
        bank_bounds = projection.bound_vectors(self.vectors)
        self.bound_index = flat_index(bank_bounds)
        self.largest_bank_norm = float(np.square(bank_bounds).sum(axis=1).max())
        self.settled_fraction = 1.0  # of the last call's queries, for logs and benchmarks

    def nearest(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        query_bounds = self.projection.bound_vectors(queries)
        margins = BOUND_ROUNDING_MARGIN * (np.square(query_bounds).sum(axis=1) + self.largest_bank_norm)
        distances = np.empty(len(queries), dtype=np.float32)
        nearest_ids = np.empty(len(queries), dtype=np.int64)
        pending = np.arange(len(queries))
        # A second, wider round settles most of what the first leaves (features with quantisation noise
        # spread their variance over more directions); brute force over all rows is the last resort.
        for candidates in (self.candidates, WIDER_ROUND_FACTOR * self.candidates):
            candidates = min(candidates, self.bound_index.ntotal)
            bounds, ids = self.bound_index.search(query_bounds[pending], candidates)
            distances[pending], nearest_ids[pending] = nearest_candidate(queries[pending], self.vectors, ids)
            if candidates >= self.bound_index.ntotal:  # every row was a candidate
                pending = pending[:0]
                break
            pending = pending[bounds[:, -1] - margins[pending] < distances[pending]]
            if not len(pending):
                break
        if len(pending):
            distances[pending], nearest_ids[pending] = self.brute_force.nearest(queries[pending])
        self.settled_fraction = 1.0 - len(pending) / len(queries) if len(queries) else 1.0
        return distances, nearest_ids


class ApproximateSearch:
    """Candidates from a compact approximate faiss index, ranked by their exact distances (faiss ``IndexRefine``).

    The index (HNSW or IVF over 8-bit rows, or a PCA projection) ranks by approximate distances;
    ``IndexRefine`` over the bundle's exact ``IndexFlatL2`` asks it for ``candidates`` rows per query
    and keeps the nearest by the exact distance, so the reported distance is always exact and a
    miss can only make it larger.

    Args:
        index: The approximate index over the memory bank, with its search parameters set.
        memory_bank: The exact flat index over the same rows, in the same order.
        candidates: Candidates asked from the index per query.
    """

    def __init__(self, index: faiss.Index, memory_bank: faiss.IndexFlatL2, candidates: int) -> None:
        self.refined = faiss.IndexRefine(index, memory_bank)  # keeps references to both indexes
        self.refined.k_factor = float(min(candidates, index.ntotal))

    def nearest(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        distances, ids = self.refined.search(np.ascontiguousarray(queries, dtype=np.float32), 1)
        return distances[:, 0], ids[:, 0]


def apply_search_parameters(index: faiss.Index, parameters: str) -> None:
    """Set search-time parameters (``"nprobe=16"``, ``"efSearch=128"``) that an index file may not keep."""
    faiss.ParameterSpace().set_index_parameters(index, parameters)
