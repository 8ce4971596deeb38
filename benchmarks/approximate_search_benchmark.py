"""faiss ``IndexRefine`` (what ``ApproximateSearch`` runs) against re-ranking the candidates by hand.

``ApproximateSearch`` used to ask the approximate index for ``candidates`` ids per query and take the
nearest by ``nearest_candidate`` (exact distances with ``fvec_L2sqr_by_idx``); it now runs faiss's
``IndexRefine`` over the bundle's exact index, which does the same inside faiss. This script checks,
on a synthetic low-rank bank (CNN features concentrate their variance likewise), that both give the
same ids and bit-identical distances, and times them (fastest of ``--runs``).

Example:
    python benchmarks/approximate_search_benchmark.py
    python benchmarks/approximate_search_benchmark.py --rows 16384 --dim 1536 --queries 4096
"""

import argparse
import time
from collections.abc import Callable

import faiss
import numpy as np
from measurements import add_json_option, write_json

from anomalib_apc.deploy.options import APPROXIMATE_INDEX_TYPES
from anomalib_apc.deploy.search import ApproximateSearch, flat_vectors, nearest_candidate
from anomalib_apc.deploy.search_export import approximate_index_recipe, build_approximate_index


def low_rank_rows(rng: np.random.Generator, rows: int, dim: int, rank: int, basis: np.ndarray) -> np.ndarray:
    return (rng.standard_normal((rows, rank)) @ basis + 0.3 * rng.standard_normal((rows, dim))).astype(np.float32)


def fastest(function: Callable[[], object], runs: int) -> float:
    seconds = []
    for _ in range(runs):
        started = time.perf_counter()
        function()
        seconds.append(time.perf_counter() - started)
    return min(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--rank", type=int, default=24)
    parser.add_argument("--queries", type=int, default=2048)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    add_json_option(parser)
    args = parser.parse_args()
    faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    basis = rng.standard_normal((args.rank, args.dim)).astype(np.float32)
    bank = low_rank_rows(rng, args.rows, args.dim, args.rank, basis)
    queries = low_rank_rows(rng, args.queries, args.dim, args.rank, basis)
    exact = faiss.IndexFlatL2(args.dim)
    exact.add(bank)
    vectors = flat_vectors(exact)
    print(f"bank {args.rows} x {args.dim} (rank {args.rank} + noise), {args.queries} queries, {args.threads} thread(s)")
    measured = {}
    for index_type in APPROXIMATE_INDEX_TYPES:
        recipe = approximate_index_recipe(index_type, args.rows, args.dim)
        index = build_approximate_index(bank, recipe)
        refine = ApproximateSearch(index, exact, recipe.candidates)

        def by_hand(index: faiss.Index = index, candidates: int = recipe.candidates) -> tuple[np.ndarray, np.ndarray]:
            _, ids = index.search(queries, candidates)
            return nearest_candidate(queries, vectors, ids)

        hand_distances, hand_ids = by_hand()
        refine_distances, refine_ids = refine.nearest(queries)
        measured[index_type] = {
            "factory": recipe.factory, "candidates": recipe.candidates,
            "same_ids": float(np.mean(hand_ids == refine_ids)),
            "bit_identical_distances": bool(np.array_equal(hand_distances, refine_distances)),
            "max_abs_difference": float(np.abs(hand_distances - refine_distances).max()),
            "by_hand_ms": fastest(by_hand, args.runs) * 1e3,
            "index_refine_ms": fastest(lambda search=refine: search.nearest(queries), args.runs) * 1e3,
        }  # fmt: skip
        row = measured[index_type]
        print(f"{index_type} ({recipe.factory}, {recipe.search_parameters}, {recipe.candidates} candidates): "
              f"same ids {row['same_ids']:.4f}, bit-identical distances {row['bit_identical_distances']}, "
              f"max |difference| {row['max_abs_difference']:.3g}; by hand {row['by_hand_ms']:.1f} ms, "
              f"IndexRefine {row['index_refine_ms']:.1f} ms")
    write_json(args.json, measured)


if __name__ == "__main__":
    main()
