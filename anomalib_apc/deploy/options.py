"""The choices that export and inference accept, and predict's output names, in a module that imports nothing heavy.

``anomalib-apc --help`` builds its argument parser from these; keeping them apart from the exporter
and the inferencer means the parser does not have to import torch, OpenVINO and faiss first.
"""

from typing import Literal, get_args

Precision = Literal["fp32", "fp16", "int8", "int8-acq"]
PRECISIONS: tuple[Precision, ...] = get_args(Precision)

ApproximateIndexType = Literal["hnsw", "ivf", "pca"]
APPROXIMATE_INDEX_TYPES: tuple[ApproximateIndexType, ...] = get_args(ApproximateIndexType)

IndexType = Literal["flat", ApproximateIndexType]
INDEX_TYPES: tuple[IndexType, ...] = get_args(IndexType)

SearchMode = Literal["default", "exact", "brute_force"]
SEARCH_MODES: tuple[SearchMode, ...] = get_args(SearchMode)

# What ``predict`` writes into its output folder.
SCORES_FILE = "scores.csv"
OVERLAY_DIR = "overlays"
