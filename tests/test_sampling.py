"""FastKCenterGreedy must select exactly the indices of anomalib's KCenterGreedy."""

import threading
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch
from anomalib.models.components.sampling import KCenterGreedy

from anomalib_apc.sampling import FastKCenterGreedy


def anomalib_indices(embedding: torch.Tensor, sampling_ratio: float, seed: int) -> list[int]:
    """anomalib's selection after seeding both generators it draws from."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    return KCenterGreedy(embedding=embedding, sampling_ratio=sampling_ratio).select_coreset_idxs()


def random_embedding(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Normal samples from a private generator, so the global random state stays the test's."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.fixture
def torch_threads() -> Iterator[Callable[[int], None]]:
    """Set torch's intra-op thread count for one test and restore it afterwards."""
    original = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(original)


@pytest.mark.parametrize(
    ("rows", "dim", "sampling_ratio", "chunk_size"),
    [
        (600, 1536, 0.05, None),  # projected, one chunk holds every row
        (3000, 256, 0.01, None),  # projected, several default-sized chunks
        (1000, 64, 0.1, 37),  # chunk size that does not divide the rows
        (120, 33, 0.25, 1),  # one row per chunk
        (150, 17, 1.0, 64),  # the whole set, down to zero distances
    ],
)
def test_same_indices_as_anomalib(rows: int, dim: int, sampling_ratio: float, chunk_size: int | None) -> None:
    embedding = random_embedding(rows, dim, seed=rows)
    fast = FastKCenterGreedy(embedding, sampling_ratio, chunk_size=chunk_size, seed=7)
    assert fast.select_coreset_idxs() == anomalib_indices(embedding, sampling_ratio, seed=7)


@pytest.mark.parametrize("threads", [1, 3])
def test_same_indices_whatever_the_thread_count(threads: int, torch_threads: Callable[[int], None]) -> None:
    embedding = random_embedding(2000, 96, seed=3)
    expected = anomalib_indices(embedding, 0.03, seed=1)
    torch_threads(threads)
    assert FastKCenterGreedy(embedding, 0.03, chunk_size=50, seed=1).select_coreset_idxs() == expected
    assert torch.get_num_threads() == threads


def test_same_indices_with_exact_ties() -> None:
    """Repeated rows give equal distances; the first of equal maxima must win, as in anomalib."""
    embedding = random_embedding(40, 24, seed=5).repeat(12, 1)
    fast = FastKCenterGreedy(embedding, 0.1, chunk_size=13, seed=2)
    assert fast.select_coreset_idxs() == anomalib_indices(embedding, 0.1, seed=2)


def test_same_indices_in_float64() -> None:
    embedding = random_embedding(800, 128, seed=11, dtype=torch.float64)
    fast = FastKCenterGreedy(embedding, 0.05, chunk_size=100, seed=4)
    assert fast.select_coreset_idxs() == anomalib_indices(embedding, 0.05, seed=4)


def test_same_indices_for_unprojected_3d_embeddings() -> None:
    """The parent flattens embeddings with more than two dimensions instead of projecting them."""
    embedding = random_embedding(300, 6, 5, seed=13)
    fast = FastKCenterGreedy(embedding, 0.1, chunk_size=40, seed=9)
    assert fast.select_coreset_idxs() == anomalib_indices(embedding, 0.1, seed=9)


def test_global_random_state_is_used_without_seed() -> None:
    embedding = random_embedding(500, 48, seed=17)
    expected = anomalib_indices(embedding, 0.1, seed=21)
    torch.manual_seed(21)
    np.random.seed(21)
    assert FastKCenterGreedy(embedding, 0.1).select_coreset_idxs() == expected


def test_seed_reproduces_and_leaves_global_generators_alone() -> None:
    embedding = random_embedding(500, 48, seed=19)
    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()[1].copy()
    first = FastKCenterGreedy(embedding, 0.1, seed=3).select_coreset_idxs()
    second = FastKCenterGreedy(embedding, 0.1, seed=3).select_coreset_idxs()
    other = FastKCenterGreedy(embedding, 0.1, seed=4).select_coreset_idxs()
    assert first == second
    assert first != other
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], numpy_state)


def test_sample_coreset_returns_the_selected_rows() -> None:
    embedding = random_embedding(400, 32, seed=23)
    indices = FastKCenterGreedy(embedding, 0.05, seed=0).select_coreset_idxs()
    coreset = FastKCenterGreedy(embedding, 0.05, seed=0).sample_coreset()
    assert torch.equal(coreset, embedding[indices])


def test_helper_threads_stop_after_selection(torch_threads: Callable[[int], None]) -> None:
    torch_threads(2)
    FastKCenterGreedy(random_embedding(1000, 32, seed=29), 0.02, chunk_size=64, seed=0).select_coreset_idxs()
    assert not [thread for thread in threading.enumerate() if thread.name.startswith("k-center-greedy")]
    assert torch.get_num_threads() == 2


def test_update_without_center_changes_nothing() -> None:
    sampler = FastKCenterGreedy(random_embedding(100, 8, seed=31), 0.1)
    sampler.update_distances(cluster_center=None)
    assert sampler.min_distances is None


def test_empty_coreset_is_rejected_like_anomalib() -> None:
    embedding = random_embedding(50, 8)
    with pytest.raises(ValueError, match="coreset_size must be a positive integer") as anomalib_error:
        KCenterGreedy(embedding, 0.01)
    with pytest.raises(ValueError, match="coreset_size must be a positive integer") as fast_error:
        FastKCenterGreedy(embedding, 0.01)
    assert str(fast_error.value) == str(anomalib_error.value)


@pytest.mark.parametrize("chunk_size", [0, -5])
def test_non_positive_chunk_size_is_rejected(chunk_size: int) -> None:
    with pytest.raises(ValueError, match="chunk_size"):
        FastKCenterGreedy(random_embedding(50, 8), 0.1, chunk_size=chunk_size)
