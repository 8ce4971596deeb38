"""Which coreset sampler builds a memory bank: the exact greedy where it is affordable, chunks beyond.

``coreset_sampler`` is a constructor argument of the model (and a benchmark setting), so a run is
reproducible: ``"exact"`` and ``"chunked"`` always mean themselves, and ``"auto"`` decides from the
bank's size alone (rows and ratio), never from the clock or the machine, and logs what it chose.
"""

import logging
from typing import Literal

import torch

from anomalib_apc.errors import check_choice

from .chunked import DEFAULT_CHUNK_ROWS, ChunkedKCenterGreedy
from .exact import FastKCenterGreedy

logger = logging.getLogger(__name__)

CoresetSampler = Literal["auto", "exact", "chunked"]
CORESET_SAMPLERS: tuple[str, ...] = ("auto", "exact", "chunked")

EXACT_GREEDY_MAX_WORK = 4e9
"""Largest rows x picks ``"auto"`` gives the exact greedy: about five minutes here, ~200k rows at a
10 % coreset, ~630k at 1 %. A greedy step reads the projected matrix (rows x ~300 float32 on
anomalib's projection) once, at about 15 GB/s on this 2-core machine: 15.7 ms per step at 200k rows.
Not lower: on BSData at 256 px (154k rows) the chunked bank cost about 2 points of pixel AUROC
(docs/coreset.md), and the exact greedy's 3 minutes there are a small part of a training run."""


def check_coreset_sampler(name: str) -> None:
    """Refuse an unknown ``coreset_sampler`` name.

    Raises:
        InvalidInputError: ``name`` is not one of :data:`CORESET_SAMPLERS`.
    """
    check_choice("coreset_sampler", name, CORESET_SAMPLERS)


def resolve_coreset_sampler(name: str, rows: int, sampling_ratio: float) -> Literal["exact", "chunked"]:
    """The sampler ``name`` stands for on a matrix of ``rows`` rows; ``"auto"`` says what it chose in the log."""
    check_coreset_sampler(name)
    if name != "auto":
        return name
    work = rows * int(rows * sampling_ratio)
    chosen = "exact" if work <= EXACT_GREEDY_MAX_WORK else "chunked"
    logger.info("coreset_sampler 'auto': %s greedy for %d rows x %d picks (exact up to %.0e).",
                chosen, rows, int(rows * sampling_ratio), EXACT_GREEDY_MAX_WORK)
    return chosen


def sample_coreset(
    embedding: torch.Tensor,
    sampling_ratio: float,
    seed: int | None,
    sampler: str,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> torch.Tensor:
    """The memory bank's rows of ``embedding`` (n, d): the coreset of the sampler ``sampler`` resolves to.

    The exact sampler selects anomalib's indices in anomalib's order; the chunked one (``chunk_rows``
    rows per chunk) its own, in chunk order. Either is deterministic under ``seed``.
    """
    if resolve_coreset_sampler(sampler, len(embedding), sampling_ratio) == "exact":
        return FastKCenterGreedy(embedding=embedding, sampling_ratio=sampling_ratio, seed=seed).sample_coreset()
    return ChunkedKCenterGreedy(sampling_ratio, chunk_rows=chunk_rows, seed=seed).sample_coreset(embedding)
