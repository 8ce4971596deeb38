"""glibc's malloc set up so that anomalib's ``KCenterGreedy`` does not grow the process without bound.

anomalib's sampler allocates one patches x projected-dimensions temporary per greedy step (31 MB on
the demo's 30,720 x 768 patches). Under glibc's default dynamic mmap threshold those temporaries are
served from the heap, where the small allocations made between two steps are carved out of the freed
temporary, so the next one no longer fits and the heap grows by about one temporary per step: the
demo's Patchcore row grew past 24 GiB and was killed by the kernel. A fixed threshold at glibc's
maximum (32 MiB) did the same inside the benchmark (24 MB more per step). A fixed threshold of
128 KiB maps every large temporary afresh and returns it when freed: the whole demo seed peaks at
3.1 GB, at the price of page faults on every step (about 40 s for those 3,071 picks).
``FastKCenterGreedy`` (APC's sampler) updates its distances in place and needs none of this.
"""

import ctypes
import logging
import os
import sys

logger = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3
"""``mallopt`` parameter (glibc's ``malloc.h``); a fixed value also turns off the dynamic threshold."""
MMAP_THRESHOLD_BYTES = 128 * 1024
"""glibc's initial threshold, kept fixed: allocations above it are mapped and unmapped on their own."""
ENVIRONMENT_SETTING = "MALLOC_MMAP_THRESHOLD_"


def map_large_temporaries() -> bool:
    """Fix the mmap threshold for this process (glibc on Linux only); returns whether it was set.

    Left alone where the user set ``MALLOC_MMAP_THRESHOLD_`` in the environment, and on other C libraries.
    """
    if not sys.platform.startswith("linux") or ENVIRONMENT_SETTING in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and other C libraries: nothing to set
        return False
    applied = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    logger.info("glibc mmap threshold fixed at %d bytes: %s.", MMAP_THRESHOLD_BYTES, "set" if applied else "refused")
    return applied
