"""Deployment of AnomalousPatchCore: a bundle (OpenVINO graph, faiss memory bank, metadata) and its inferencer.

The names below are imported on first use, so that ``anomalib-apc --help`` and the argument parsers
do not pay for torch, OpenVINO and faiss.

Example:
    >>> from anomalib_apc.deploy import ApcInferencer, export_bundle, predict_folder
    >>> export_bundle("results/.../model.ckpt", "bundle")
    >>> ApcInferencer("bundle").predict("image.png").pred_score
    >>> predict_folder("bundle", ["images/"], "predictions").failures
"""

import importlib
from typing import Any

_MODULE_OF = {
    "BUNDLE_FORMAT_VERSION": "metadata",
    "INDEX_TYPES": "options",
    "PRECISIONS": "options",
    "SEARCH_MODES": "options",
    "ApcInferencer": "inferencer",
    "BundleMetadata": "metadata",
    "ImageReadError": "images",
    "ParityReport": "parity",
    "PredictionSummary": "predict",
    "compare_with_model": "parity",
    "export_bundle": "bundle",
    "load_checkpoint": "checkpoint",
    "predict_folder": "predict",
    "read_metadata": "metadata",
}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        msg = f"module {__name__!r} has no attribute {name!r}"
        raise AttributeError(msg)
    return getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
