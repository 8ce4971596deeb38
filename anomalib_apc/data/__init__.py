"""Data for APC: supervised splits of anomalib datamodules, CutPaste with real defects, demo data.

Imports nothing else from this project, so every other part can build on it.
"""

from anomalib_apc.data.cutpaste import CutPaste
from anomalib_apc.data.demo import make_demo_dataset
from anomalib_apc.data.supervised import (
    SPLIT_FILE_NAME,
    SupervisedFolder,
    SupervisedMVTecAD,
    SupervisedSplitMixin,
    select_anomalies,
)

__all__ = [
    "SPLIT_FILE_NAME",
    "CutPaste",
    "SupervisedFolder",
    "SupervisedMVTecAD",
    "SupervisedSplitMixin",
    "make_demo_dataset",
    "select_anomalies",
]
