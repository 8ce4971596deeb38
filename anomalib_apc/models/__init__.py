"""Models of anomalib-apc, importable by anomalib's CLI under their short names."""

from .apc import AnomalousPatchCore, AnomalousPatchCoreModel

__all__ = ["AnomalousPatchCore", "AnomalousPatchCoreModel"]
