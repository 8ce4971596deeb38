"""``python -m anomalib_apc.benchmark``: the same command as ``anomalib-apc benchmark``."""

import sys

from anomalib_apc.cli import main

if __name__ == "__main__":
    sys.exit(main(["benchmark", *sys.argv[1:]]))
