"""Small torch CPU kernels run on the calling thread, and work handed out to competing Python threads.

The exact sampler splits each greedy step into cache-sized chunks. Letting each small kernel open its
own OpenMP region costs hundreds of barriers per step, and with other processes on the cores a
descheduled OpenMP thread stalls the rest; Python threads that each run single-threaded kernels
(torch releases the GIL inside them) and take the next chunk when free avoid both. The chunked
sampler's greedy steps are sequential and already in cache: it runs them single-threaded too.
"""

import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch


@contextmanager
def single_threaded_torch_ops() -> Iterator[None]:
    """Make torch CPU kernels started inside the block run on their calling thread.

    The intra-op thread count is per thread once a thread has run a kernel; threads that run their
    first kernel inside the block keep one thread, the calling thread gets its count back.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class WorkDispenser:
    """Hands out the items of an iterable (chunk starts, chunk numbers) to competing threads, each exactly once."""

    def __init__(self, items: Iterable[int]) -> None:
        self._items = iter(items)
        self._lock = threading.Lock()

    def __iter__(self) -> "WorkDispenser":
        return self

    def __next__(self) -> int:
        with self._lock:
            return next(self._items)
