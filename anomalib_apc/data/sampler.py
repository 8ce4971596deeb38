"""The training draws (balanced between normal and anomalous), and the evaluation shards, for one or several ranks.

Both samplers are ``DistributedSampler`` subclasses so that Lightning's DDP leaves them as they are
(it wraps any other sampler in its own padded ``DistributedSampler``): they split the data across
ranks themselves, without the repeats that padding would add.
"""

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DistributedSampler


class TrainDrawSampler(DistributedSampler):
    """Draws training indices, each with a seed for the randomness of that one sample.

    An epoch has as many draws as there are training images (rounded up to a multiple of
    ``num_replicas``). With ``balanced``, draws are made with replacement so that normal and anomalous
    images come equally often (the few anomalies are oversampled); without it, an epoch is a random
    permutation (its first draws repeated to fill the last round). Epoch ``k`` of a sampler built with
    ``seed`` is always the same, whatever the number of dataloader workers, because the per-sample
    seeds are drawn here, in the main process.

    Under DDP every rank draws the same epoch from ``seed`` and keeps the draws ``rank::num_replicas``:
    the ranks' draws never overlap, each rank has the same number of them (so the same number of
    steps), and a run is reproducible for a given number of ranks. One rank draws exactly what the
    single-process sampler draws.
    """

    def __init__(self, labels: Sequence[int], balanced: bool, seed: int, num_replicas: int = 1, rank: int = 0) -> None:
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        super().__init__(self.labels, num_replicas=num_replicas, rank=rank, shuffle=False, seed=seed)
        self.balanced = balanced
        self.epoch = 0
        self.num_samples = -(-len(self.labels) // num_replicas)
        self.total_size = self.num_samples * num_replicas

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch_seed = int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0])
        generator = torch.Generator().manual_seed(epoch_seed)
        self.epoch += 1
        if self.balanced:
            weight_of_each_sample = 1.0 / torch.bincount(self.labels).float()[self.labels]
            indices = torch.multinomial(weight_of_each_sample, self.total_size, replacement=True, generator=generator)
        else:
            indices = torch.randperm(len(self.labels), generator=generator)
            indices = torch.cat([indices, indices[: self.total_size - len(indices)]])
        sample_seeds = torch.randint(2**62, (self.total_size,), generator=generator)
        draws = zip(indices.tolist(), sample_seeds.tolist(), strict=True)
        return iter(list(draws)[self.rank :: self.num_replicas])


class ContiguousShardSampler(DistributedSampler):
    """This rank's contiguous run of the batches one process would read, in order; no repeats, no padding.

    Rank ``r`` of ``num_replicas`` reads the ``r``-th contiguous run of the ``batch_size`` batches of
    ``range(length)``; the ranks' runs in rank order are the single-process batches, so metrics that
    gather per-image results across ranks see every image exactly once, and each image is in the same
    batch as in one process. Ranks may read one batch more than others (fine for evaluation, which
    has no per-step collective).
    """

    def __init__(self, length: int, batch_size: int, num_replicas: int, rank: int) -> None:
        super().__init__(range(length), num_replicas=num_replicas, rank=rank, shuffle=False)
        batches = -(-length // batch_size)
        first, last = batches * rank // num_replicas, batches * (rank + 1) // num_replicas
        self.indices = range(first * batch_size, min(last * batch_size, length))
        self.num_samples = len(self.indices)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)
