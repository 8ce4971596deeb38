"""AnomalousPatchCore: PatchCore on an encoder fine-tuned with a few real anomalies."""

from .lightning_model import AnomalousPatchCore
from .torch_model import AnomalousPatchCoreModel

__all__ = ["AnomalousPatchCore", "AnomalousPatchCoreModel"]
