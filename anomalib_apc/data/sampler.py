"""The training draws: which image each training sample is, balanced between normal and anomalous."""

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler


class TrainDrawSampler(Sampler[tuple[int, int]]):
    """Draws training indices, each with a seed for the randomness of that one sample.

    An epoch has as many draws as there are training images. With ``balanced``, draws are made with
    replacement so that normal and anomalous images come equally often (the few anomalies are
    oversampled); without it, an epoch is a random permutation. Epoch ``k`` of a sampler built with
    ``seed`` is always the same, whatever the number of dataloader workers, because the per-sample
    seeds are drawn here, in the main process.
    """

    def __init__(self, labels: Sequence[int], balanced: bool, seed: int) -> None:
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.balanced = balanced
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.labels)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch_seed = int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0])
        generator = torch.Generator().manual_seed(epoch_seed)
        self.epoch += 1
        if self.balanced:
            weight_of_each_sample = 1.0 / torch.bincount(self.labels).float()[self.labels]
            indices = torch.multinomial(weight_of_each_sample, len(self.labels), replacement=True, generator=generator)
        else:
            indices = torch.randperm(len(self.labels), generator=generator)
        sample_seeds = torch.randint(2**62, (len(self.labels),), generator=generator)
        return iter(zip(indices.tolist(), sample_seeds.tolist(), strict=True))
