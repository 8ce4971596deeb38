"""The chunked coreset sampler covers the data almost as well as the exact greedy, deterministically.

Coverage radius: the largest distance from any row to its nearest selected row, the quantity greedy
k-center keeps within twice the optimum. The fixed set imitates patch features: rows around a few
hundred prototypes, non-negative, a few strays far from them, and exact duplicates. Every chunk holds
rows of every prototype, as every image holds the same textures, so a chunk that ignored what earlier
chunks picked would spend its share on them again: 4x the exact radius here instead of 1.0x.
"""

import logging
from collections.abc import Callable, Iterator

import pytest
import torch

from anomalib_apc.errors import InvalidInputError
from anomalib_apc.sampling import (
    ChunkedKCenterGreedy,
    FastKCenterGreedy,
    PatchRowCollector,
    allocate_rows,
    resolve_coreset_sampler,
    sample_coreset,
)
from anomalib_apc.sampling.selection import EXACT_GREEDY_MAX_WORK

ROWS, DIM, RATIO, CHUNK_ROWS = 12_000, 96, 0.05, 2_000


@pytest.fixture(scope="module")
def patches() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    prototypes = torch.randn(300, DIM, generator=generator) * 2
    assignment = torch.randint(len(prototypes), (ROWS,), generator=generator)
    spread = torch.where(torch.rand(ROWS, generator=generator) < 0.02, 3.0, 0.3)  # 2 % stray patches
    rows = (prototypes[assignment] + torch.randn(ROWS, DIM, generator=generator) * spread[:, None]).relu()
    rows[torch.randint(ROWS, (ROWS // 10,), generator=generator)] = rows[: ROWS // 10].clone()
    return rows


@pytest.fixture
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def coverage_radius(rows: torch.Tensor, bank: torch.Tensor) -> float:
    return float(torch.cdist(rows, bank).min(dim=1).values.max())


def test_chunks_cover_every_row_once_with_anomalibs_total_of_picks() -> None:
    sampler = ChunkedKCenterGreedy(0.1, chunk_rows=300)
    chunks = sampler.chunks(1_001)
    assert [(chunk.start, chunk.stop) for chunk in chunks] == [(0, 300), (300, 600), (600, 900), (900, 1001)]
    assert sum(chunk.picks for chunk in chunks) == int(1_001 * 0.1)  # anomalib's coreset size
    assert [chunk.picks for chunk in chunks] == [29, 30, 30, 11]  # floor(100 * stop / 1001) differences


def test_chunked_bank_covers_the_data_within_a_stated_factor_of_exact_greedy(patches: torch.Tensor) -> None:
    exact = FastKCenterGreedy(patches, RATIO, seed=0).sample_coreset()
    chunked = ChunkedKCenterGreedy(RATIO, chunk_rows=CHUNK_ROWS, seed=0).sample_coreset(patches)
    chosen = torch.randperm(ROWS, generator=torch.Generator().manual_seed(0))[: len(exact)]
    assert len(chunked) == len(exact) == int(ROWS * RATIO)
    exact_radius, chunked_radius = coverage_radius(patches, exact), coverage_radius(patches, chunked)
    random_radius = coverage_radius(patches, patches[chosen])
    assert chunked_radius <= 1.25 * exact_radius  # measured: 4.08 vs 3.96 (1.03x), 6 chunks of 2,000 rows
    assert chunked_radius < 0.5 * random_radius  # the control: as many rows drawn at random leave 27.4


def test_each_pick_is_the_chunk_row_farthest_from_every_earlier_pick(patches: torch.Tensor) -> None:
    sampler = ChunkedKCenterGreedy(RATIO, chunk_rows=CHUNK_ROWS, projection_dim=DIM, seed=0)  # not projected
    chosen = sampler.select_indices(sampler.project(patches)).tolist()
    per_chunk = int(CHUNK_ROWS * RATIO)
    earlier, third_chunk = chosen[: 2 * per_chunk], chosen[2 * per_chunk : 3 * per_chunk]
    rows = patches[2 * CHUNK_ROWS : 3 * CHUNK_ROWS]
    assert all(2 * CHUNK_ROWS <= index < 3 * CHUNK_ROWS for index in third_chunk)
    nearest = torch.cdist(rows, patches[earlier]).min(dim=1).values  # the first two chunks' picks count too
    for index in third_chunk:
        assert nearest[index - 2 * CHUNK_ROWS] >= nearest.max() - 1e-3  # the farthest row, up to near-ties
        nearest = torch.minimum(nearest, torch.cdist(rows, patches[index : index + 1]).squeeze(1))


def test_same_seed_same_bank_other_seed_other_bank(patches: torch.Tensor) -> None:
    def indices(seed: int) -> torch.Tensor:
        return ChunkedKCenterGreedy(RATIO, chunk_rows=CHUNK_ROWS, seed=seed).select_coreset_idxs(patches)

    assert torch.equal(indices(3), indices(3))
    assert not torch.equal(indices(3), indices(4))


class BackwardsBlocks:
    """Computes the blocks last to first, as another process might, and puts them back in order."""

    def __init__(self) -> None:
        self.blocks = 0

    def concatenated_blocks(self, count: int, compute: Callable[[int], torch.Tensor]) -> torch.Tensor:
        self.blocks += count
        return torch.cat([compute(block) for block in reversed(range(count))][::-1])


def test_the_bank_does_not_depend_on_threads_or_on_who_computes_the_blocks(
    patches: torch.Tensor, one_thread: None
) -> None:
    del one_thread
    sampler = ChunkedKCenterGreedy(RATIO, chunk_rows=CHUNK_ROWS, seed=0)
    projected = sampler.project(patches)
    alone = sampler.select_indices(projected)
    torch.set_num_threads(2)
    assert torch.equal(sampler.select_indices(projected), alone)
    share = BackwardsBlocks()
    assert torch.equal(sampler.select_indices(projected, share=share), alone)
    assert share.blocks == 5  # chunks 2..6 measure their rows against the bank so far, one block each


def test_memory_mapped_patches_give_the_same_bank(patches: torch.Tensor) -> None:
    collector = PatchRowCollector("disk", expected_images=12)
    for batch in patches.split(1_000):
        collector.add(batch, images=1)
    assert collector.on_disk
    mapped = collector.rows()
    assert torch.equal(mapped, patches)
    in_memory = sample_coreset(patches, RATIO, 0, "chunked", CHUNK_ROWS)
    assert torch.equal(sample_coreset(mapped, RATIO, 0, "chunked", CHUNK_ROWS), in_memory)
    assert torch.equal(sample_coreset(mapped, RATIO, 0, "exact"), sample_coreset(patches, RATIO, 0, "exact"))


def test_memory_storage_concatenates_in_order() -> None:
    collector = PatchRowCollector("memory", expected_images=2)
    collector.add(torch.zeros(2, 3), images=1)
    collector.add(torch.ones(1, 3), images=1)
    assert not collector.on_disk
    assert collector.rows().tolist() == [[0.0] * 3, [0.0] * 3, [1.0] * 3]


def test_auto_storage_goes_to_disk_only_when_the_patches_would_fill_memory() -> None:
    small = PatchRowCollector("auto", expected_images=10)
    small.add(torch.zeros(4, 8), images=2)
    assert not small.on_disk
    huge = PatchRowCollector("auto", expected_images=10**9)  # ~64 GB of expected patches
    huge.add(torch.zeros(4, 8), images=2)
    assert huge.on_disk
    uncounted = PatchRowCollector("auto", expected_images=None)  # batches from a plain iterable
    uncounted.add(torch.zeros(4, 8), images=2)
    assert not uncounted.on_disk
    assert allocate_rows((3, 2), torch.float32, torch.device("cpu"), "disk").shape == (3, 2)


def test_auto_sampler_is_exact_up_to_its_work_limit_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    limit = int((EXACT_GREEDY_MAX_WORK / 0.1) ** 0.5)  # rows x picks reach the limit here at 10 %
    with caplog.at_level(logging.INFO, logger="anomalib_apc.sampling.selection"):
        assert resolve_coreset_sampler("auto", limit - 50, 0.1) == "exact"
        assert resolve_coreset_sampler("auto", limit + 50, 0.1) == "chunked"
        assert resolve_coreset_sampler("auto", 1_000_000, 0.01) == "chunked"
    assert "chunked greedy for 1000000 rows x 10000 picks" in caplog.text
    assert resolve_coreset_sampler("exact", 10**7, 0.1) == "exact"  # an explicit choice is kept
    assert resolve_coreset_sampler("chunked", 10, 0.1) == "chunked"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"coreset_sampler": "fast"}, "coreset_sampler must be one of \\['auto', 'exact', 'chunked'\\], got 'fast'"),
        ({"patch_storage": "ssd"}, "patch_storage must be one of \\['auto', 'memory', 'disk'\\], got 'ssd'"),
        ({"coreset_chunk_rows": 0}, "coreset_chunk_rows must be a positive number of rows, got 0"),
    ],
)
def test_bad_coreset_arguments_are_refused_when_the_model_is_made(arguments: dict, message: str) -> None:
    from anomalib_apc.models import AnomalousPatchCore

    with pytest.raises(InvalidInputError, match=message):
        AnomalousPatchCore(backbone="resnet18", pre_trained=False, **arguments)
