"""What a benchmark script measured, as JSON beside the tables it prints (``--json FILE``).

The printed tables are for people; the JSON holds the same values unrounded, for the tests and for
comparing runs without parsing text. Every script in this folder takes the option, except
``ddp_benchmark.py``, which always writes ``result.json`` into its ``--out`` folder.
"""

import argparse
import json
from pathlib import Path
from typing import Any


def add_json_option(parser: argparse.ArgumentParser) -> None:
    """Give ``parser`` the ``--json FILE`` option every benchmark script shares."""
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write every measured value to FILE as JSON")


def write_json(path: Path | None, measurements: Any) -> None:
    """Write ``measurements`` to ``path`` (nothing when ``--json`` was not given)."""
    if path is not None:
        path.write_text(json.dumps(measurements, indent=2))
