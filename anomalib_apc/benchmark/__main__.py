"""``python -m anomalib_apc.benchmark``: the same options as ``anomalib-apc benchmark``."""

import sys

from anomalib_apc.benchmark.cli import main

if __name__ == "__main__":
    sys.exit(main())
