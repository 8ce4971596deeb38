"""Coreset selection for memory banks: anomalib's exact greedy made fast, and a chunked greedy for large banks."""

from .chunked import DEFAULT_CHUNK_ROWS, ChunkedKCenterGreedy
from .exact import FastKCenterGreedy, seeded_global_rngs
from .selection import (
    CORESET_SAMPLERS,
    CoresetSampler,
    check_coreset_sampler,
    resolve_coreset_sampler,
    sample_coreset,
)
from .storage import (
    PATCH_STORAGES,
    PatchRowCollector,
    PatchStorage,
    allocate_rows,
    check_patch_storage,
    concatenate_releasing,
)

__all__ = [
    "CORESET_SAMPLERS",
    "DEFAULT_CHUNK_ROWS",
    "PATCH_STORAGES",
    "ChunkedKCenterGreedy",
    "CoresetSampler",
    "FastKCenterGreedy",
    "PatchRowCollector",
    "PatchStorage",
    "allocate_rows",
    "check_coreset_sampler",
    "check_patch_storage",
    "concatenate_releasing",
    "resolve_coreset_sampler",
    "sample_coreset",
    "seeded_global_rngs",
]
