"""kornia's random draws made from a caller's ``torch.Generator``, leaving the global random state alone.

kornia augmentations draw their parameters from the global CPU generator. The training samples of
this package are reproducible from their own seed (see :class:`.sampler.TrainDrawSampler`), whatever
process or dataloader worker makes them, so kornia is run in a fork of the global state that is
seeded from the sample's generator.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def kornia_draws_from(generator: torch.Generator) -> Iterator[None]:
    """Within the block, kornia's draws follow ``generator`` (one draw is taken from it); restored after."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(int(torch.randint(2**62, (), generator=generator)))
        yield
