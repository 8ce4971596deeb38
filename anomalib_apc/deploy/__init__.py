"""Deployment of AnomalousPatchCore: a bundle (OpenVINO graph, faiss memory bank, metadata) and its inferencer.

Example:
    >>> from anomalib_apc.deploy import ApcInferencer, export_bundle
    >>> export_bundle("results/.../model.ckpt", "bundle")
    >>> ApcInferencer("bundle").predict("image.png").pred_score
"""

from .bundle import INDEX_TYPES, PRECISIONS, export_bundle, load_checkpoint
from .images import ImageReadError
from .inferencer import SEARCH_MODES, ApcInferencer
from .metadata import BUNDLE_FORMAT_VERSION, BundleMetadata, read_metadata
from .parity import ParityReport, compare_with_model

__all__ = [
    "BUNDLE_FORMAT_VERSION",
    "INDEX_TYPES",
    "PRECISIONS",
    "SEARCH_MODES",
    "ApcInferencer",
    "BundleMetadata",
    "ImageReadError",
    "ParityReport",
    "compare_with_model",
    "export_bundle",
    "load_checkpoint",
    "read_metadata",
]
