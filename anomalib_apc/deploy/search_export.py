"""The search part of a bundle export: build the search structures, measure them, record the figures.

Whether exact search uses the lower bound is decided by timing it against brute force on sample
queries, and an approximate index is shipped with its recall against exact search; both are
measured here, at export, on patches of validation images when given, else of calibration images
(optimistic: the memory bank's own images), else on memory-bank rows held out as queries. What runs
at inference is ``anomalib_apc.deploy.search``.
"""

import logging
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
from tqdm import tqdm

from anomalib_apc.errors import InvalidInputError

from .calibration import VALIDATION_SOURCE, SampleQueries
from .metadata import APPROXIMATE_INDEX_FILE, BOUND_PROJECTION_FILE
from .options import APPROXIMATE_INDEX_TYPES, ApproximateIndexType
from .search import (
    ApproximateSearch,
    BoundedExactSearch,
    BoundProjection,
    BruteForceSearch,
    NearestNeighbourSearch,
    apply_search_parameters,
    flat_index,
    flat_vectors,
)

logger = logging.getLogger(__name__)

# Exact search's lower bound uses a sixth of the feature dimensions (256 of ResNet-50's 1,536): on
# random-init ResNet-50 features of generated images it settled 99.7 % of test patches with 16
# candidates and searched 3.7x faster than brute force, where 64 dimensions settled half of them and
# a cascade of a small and a large bound gained nothing (the top-k selection of a flat search costs
# about as much as 150 dimensions of dot products).
BOUND_DIM_FRACTION = 6
BOUND_CANDIDATES = 16

# Nearest distances below this fraction of the median are taken for duplicates of a memory-bank row.
DUPLICATE_DISTANCE_FRACTION = 1e-3
# Found distances within this fraction of the exact one are ties (float rounding between equal rows).
TIE_TOLERANCE = 1e-4


@dataclass(frozen=True)
class BoundMeasurement:
    """Bounded exact search against brute force on the same sample queries, timed in one process.

    Attributes:
        settled_fraction: Of the sample queries, those the bound settles.
        bounded_seconds: Fastest of a few runs of the bounded search over all sample queries.
        brute_force_seconds: The same for brute force.
        queries: Number of sample queries.
        query_source: Where they came from.
    """

    settled_fraction: float
    bounded_seconds: float
    brute_force_seconds: float
    queries: int
    query_source: str

    @property
    def speedup(self) -> float:
        return self.brute_force_seconds / max(self.bounded_seconds, 1e-9)


def measure_bound(
    memory_bank: faiss.IndexFlatL2,
    projection: BoundProjection,
    queries: np.ndarray,
    query_source: str,
    candidates: int,
    runs: int = 2,
) -> BoundMeasurement:
    """Time the bounded search and brute force on ``queries`` (alternately, keeping each one's fastest run).

    Timing decides whether a bundle uses the bound: how much a flat search costs besides its dot
    products (top-k selection, distance assembly) depends on the CPU and on ``candidates``, and
    how many queries the bound settles depends on the data, so neither is worth modelling.
    """
    bounded = BoundedExactSearch(memory_bank, projection, candidates)
    brute_force = BruteForceSearch(memory_bank)
    seconds: dict[str, list[float]] = {"bounded": [], "brute force": []}
    for _ in tqdm(range(runs), desc="Timing the exact-search bound against brute force", unit="run"):
        for name, search in (("bounded", bounded), ("brute force", brute_force)):
            started = time.perf_counter()
            search.nearest(queries)
            seconds[name].append(time.perf_counter() - started)
    return BoundMeasurement(bounded.settled_fraction, min(seconds["bounded"]), min(seconds["brute force"]),
                            len(queries), query_source)


def held_out_split(vectors: np.ndarray, fraction: float = 0.1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Memory-bank rows held out as sample queries, and the other rows, for searches without images.

    A stand-in for test patches: how far they lie from their neighbours differs from test images
    (a coreset spreads the memory bank out; anomalous patches lie further still), so patches of
    real images, where given, make the better sample.
    """
    order = np.random.default_rng(seed).permutation(len(vectors))
    held_out = max(1, int(len(vectors) * fraction))
    return vectors[np.sort(order[:held_out])], np.ascontiguousarray(vectors[np.sort(order[held_out:])])


@dataclass(frozen=True)
class ApproximateIndexRecipe:
    """How an approximate index was built and is searched, as recorded in a bundle's metadata."""

    type: ApproximateIndexType
    factory: str
    search_parameters: str
    candidates: int


def approximate_index_recipe(index_type: ApproximateIndexType, size: int, dim: int) -> ApproximateIndexRecipe:
    """Sensible faiss settings for a memory bank of ``size`` rows of ``dim`` features.

    Each recipe stores the rows compactly and proposes candidates that are re-ranked against the
    exact rows, so a miss costs a larger distance, never a smaller one:

    - HNSW: 32 links per node over 8-bit scalar-quantised rows (a quarter of the bytes), search beam 128.
    - IVF: about ``sqrt(size)`` inverted lists (at least 39 training rows each, as faiss asks) of 8-bit
      rows, an eighth of them probed.
    - PCA: the rows projected on their ``dim / 12`` principal axes (128 of ResNet-50's 1,536), scanned
      in full; 32 candidates, as the projection ranks less sharply than the 8-bit rows.

    Measured on 2,048 patches of MPDD metal_plate test images against a 16,384 x 1,536 bank of
    random-init ResNet-50 features (two cores, per 1,024 queries, HNSW's beam then 64): exact search
    with the bound 62 ms, HNSW 45 ms, PCA 40 ms, IVF 82 ms; a flat scan of 8-bit rows took 1.2 s (no
    BLAS). Product quantisation is left out: on that bank it took minutes to train on two cores. On
    every test patch of MPDD, BSData and DeepPCB (``benchmarks/deploy_benchmark.py``), PCA's
    candidates held the exact nearest row for all but 0.02 % of the patches and moved no image score,
    while HNSW (beam 128) missed 0.05-0.4 % and moved image scores by up to 30 %; a beam of 64 left
    distance errors of 146x on DeepPCB's test patches, 512 still 3.7x.
    """
    if index_type == "hnsw":
        return ApproximateIndexRecipe(index_type, "HNSW32,SQ8", "efSearch=128", candidates=16)
    if index_type == "ivf":
        lists = max(1, min(round(math.sqrt(size)), size // 39))
        return ApproximateIndexRecipe(index_type, f"IVF{lists},SQ8", f"nprobe={max(1, lists // 8)}", candidates=16)
    if index_type == "pca":
        return ApproximateIndexRecipe(index_type, f"PCA{max(1, dim // 12)},Flat", "", candidates=32)
    msg = f"Unknown approximate index type {index_type!r}; choose from {list(APPROXIMATE_INDEX_TYPES)}."
    raise InvalidInputError(msg)


def build_approximate_index(vectors: np.ndarray, recipe: ApproximateIndexRecipe) -> faiss.Index:
    """Train and fill the index ``recipe`` describes, with its search parameters applied."""
    index = faiss.index_factory(vectors.shape[1], recipe.factory, faiss.METRIC_L2)
    index.train(vectors)
    index.add(vectors)
    apply_search_parameters(index, recipe.search_parameters)
    return index


@dataclass(frozen=True)
class RecallReport:
    """How an approximate search compares with exact search on the same queries.

    Attributes:
        recall_at_1: Fraction of queries for which it finds the exact nearest row, or another row
            as near (within ``TIE_TOLERANCE``: equal rows, which flat backgrounds put in a memory bank).
        mean_relative_distance_error: ``mean found distance / mean exact distance - 1`` (0 when
            exact), what misses cost the patch scores on average.
        max_relative_distance_error: The largest ``found distance / exact distance - 1`` of a single
            query: the most a miss changes one patch score (queries that duplicate a memory-bank row,
            closer to it than ``DUPLICATE_DISTANCE_FRACTION`` of the median distance, left out).
        mean_exact_distance: Mean distance of a query to its exact nearest row: the scale the
            relative errors are taken against (test patches lie further out than training ones).
        queries: Number of query rows.
        query_source: Where the queries came from.
    """

    recall_at_1: float
    mean_relative_distance_error: float
    max_relative_distance_error: float
    mean_exact_distance: float
    queries: int
    query_source: str


def measure_recall(
    approximate: NearestNeighbourSearch,
    exact: NearestNeighbourSearch,
    query_chunks: Iterable[np.ndarray],
    query_source: str,
) -> RecallReport:
    """Recall at 1 of ``approximate`` against ``exact`` on chunks of query rows, with a progress bar.

    Chunks, so that callers can stream the patches of many images through without holding them all.
    """
    queries = hits = 0
    found_total = exact_total = largest_error = 0.0
    for chunk in tqdm(query_chunks, desc="Measuring recall against exact search", unit="chunk"):
        chunk = np.ascontiguousarray(chunk, dtype=np.float32)
        exact_distances, exact_ids = exact.nearest(chunk)
        approximate_distances, approximate_ids = approximate.nearest(chunk)
        queries += len(chunk)
        found, nearest = np.sqrt(approximate_distances.clip(min=0)), np.sqrt(exact_distances.clip(min=0))
        # Patches of flat background repeat in the memory bank: another copy of the nearest row is as near.
        typical = np.median(nearest)
        tied = found <= nearest + TIE_TOLERANCE * np.maximum(nearest, typical)
        hits += int(((approximate_ids == exact_ids) | tied).sum())
        found_total += float(found.sum())
        exact_total += float(nearest.sum())
        # A query at float-rounding distance from its nearest row is that row (patches of flat background
        # repeat): its relative error is a ratio of rounding noise, and its miss already counts against recall.
        measurable = nearest > DUPLICATE_DISTANCE_FRACTION * typical
        if measurable.any():
            largest_error = max(largest_error, float((found[measurable] / nearest[measurable] - 1.0).max()))
    relative_error = found_total / exact_total - 1.0 if exact_total > 0 else 0.0
    return RecallReport(hits / max(queries, 1), relative_error, largest_error, exact_total / max(queries, 1), queries,
                        query_source)


def row_chunks(rows: np.ndarray, chunk_size: int = 1024) -> Iterator[np.ndarray]:
    """``rows`` in chunks of ``chunk_size``, for ``measure_recall``."""
    for start in range(0, len(rows), chunk_size):
        yield rows[start:start + chunk_size]


def held_out_recall(vectors: np.ndarray, recipe: ApproximateIndexRecipe) -> RecallReport:
    """Recall of ``recipe`` when no image patches are at hand: memory-bank rows held out as queries.

    The index under test is built, as the recipe says, on the other rows only, so that no query finds
    itself (see ``held_out_split``).
    """
    queries, rest = held_out_split(vectors)
    exact_index = flat_index(rest)
    approximate = ApproximateSearch(build_approximate_index(rest, recipe), exact_index, recipe.candidates)
    source = f"{len(queries)} memory-bank rows held out of an index built on the other {len(rest)}"
    return measure_recall(approximate, BruteForceSearch(exact_index), row_chunks(queries), source)


def export_bound(exact_index: faiss.IndexFlatL2, sample: SampleQueries | None, directory: Path) -> dict | None:
    """Save the exact-search bound if it beats brute force on sample queries; its metadata, or ``None``."""
    vectors = flat_vectors(exact_index)
    projection = BoundProjection.fit(vectors, max(1, vectors.shape[1] // BOUND_DIM_FRACTION))
    if sample is not None:
        index, queries, source = exact_index, sample.rows, sample.source
    else:
        queries, rest = held_out_split(vectors)
        index = flat_index(rest)
        source = f"{len(queries)} memory-bank rows held out of the other {len(rest)}"
    measurement = measure_bound(index, projection, queries, source, BOUND_CANDIDATES)
    if measurement.speedup <= 1:
        logger.warning("Exact search: the bound is no faster than brute force on %s (it settles %.1f %%); the "
                       "bundle searches by brute force.", source, 100 * measurement.settled_fraction)
        return None
    projection.save(directory / BOUND_PROJECTION_FILE)
    logger.info("Exact search: a %d-dimensional bound settles %.1f %% of %s, %.1fx faster than brute force.",
                projection.dim, 100 * measurement.settled_fraction, source, measurement.speedup)
    return {
        "file": BOUND_PROJECTION_FILE,
        "dim": projection.dim,
        "explained_variance": projection.explained_variance,
        "candidates": BOUND_CANDIDATES,
        "settled_fraction": measurement.settled_fraction,
        "measured_speedup_vs_brute_force": measurement.speedup,
        "measured_on": source,
    }


def export_approximate_index(
    exact_index: faiss.IndexFlatL2,
    index_type: ApproximateIndexType,
    sample: SampleQueries | None,
    directory: Path,
) -> dict:
    """Build and save an approximate index, measure its recall against exact search; its metadata."""
    vectors = flat_vectors(exact_index)
    recipe = approximate_index_recipe(index_type, *vectors.shape)
    logger.info("Building the %s index %s over %d rows.", index_type, recipe.factory, len(vectors))
    index = build_approximate_index(vectors, recipe)
    faiss.write_index(index, str(directory / APPROXIMATE_INDEX_FILE))
    if sample is not None:
        approximate = ApproximateSearch(index, exact_index, recipe.candidates)
        report = measure_recall(approximate, BruteForceSearch(exact_index), row_chunks(sample.rows), sample.source)
    else:
        report = held_out_recall(vectors, recipe)
    # Misses change scores, so they are worth a warning; a perfect recall is just information.
    advice = "" if sample is None or sample.source == VALIDATION_SOURCE else (
        "; the memory bank's own images flatter an index: pass --validation-images to measure it on others")
    logger.log(
        logging.WARNING if report.recall_at_1 < 1 else logging.INFO,
        "%s index: recall@1 %.4f against exact search, nearest distances %.2e larger on average and %.2e at most "
        "(%d queries: %s)%s.",
        index_type, report.recall_at_1, report.mean_relative_distance_error, report.max_relative_distance_error,
        report.queries, report.query_source, advice,
    )
    return {
        "file": APPROXIMATE_INDEX_FILE,
        "type": index_type,
        "factory": recipe.factory,
        "search_parameters": recipe.search_parameters,
        "candidates": recipe.candidates,
        "recall_at_1": report.recall_at_1,
        "mean_relative_distance_error": report.mean_relative_distance_error,
        "max_relative_distance_error": report.max_relative_distance_error,
        "mean_exact_distance": report.mean_exact_distance,
        "bytes": (directory / APPROXIMATE_INDEX_FILE).stat().st_size,
        "recall_queries": report.queries,
        "recall_query_source": report.query_source,
    }
