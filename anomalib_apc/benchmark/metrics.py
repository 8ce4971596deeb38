"""The benchmark's metrics: anomalib's AUROC, F1Max and AUPRO on raw scores, with the scores kept in order.

torchmetrics reads scores outside [0, 1] as logits and applies a sigmoid first, which in float32
is 1.0 for every score above about 17: raw PatchCore-family scores (MHPatchcore's are in the
hundreds) then all tie, and the AUROC falls to 50 % whatever the ranking. :func:`unit_interval`
maps raw scores into (0, 1) by a strictly increasing function in float64 first, so the ranking, and
with it AUROC, F1Max's best threshold and every ROC curve, is the raw scores'.
"""

import copy
import math
from typing import Any

import torch
from anomalib import metrics as anomalib_metrics

METRIC_NAMES = ("image_AUROC", "image_F1Max", "pixel_AUROC", "pixel_F1Max", "pixel_AUPRO")
"""Names under which anomalib's ``Evaluator`` reports the metrics of :func:`make_evaluator`."""


def unit_interval(scores: torch.Tensor) -> torch.Tensor:
    """``0.5 + atan(scores) / pi`` in float64: strictly increasing, into (0, 1), distinct for distinct scores.

    float64 keeps scores up to about 1e7 apart that differ by one part in a million.
    """
    return 0.5 + torch.atan(scores.double()) / math.pi


class _RankedScores:
    """Mixin for an anomalib metric: its score field goes through :func:`unit_interval` before the update."""

    fields: list[str]

    def update(self, batch: Any, *args: Any, **kwargs: Any) -> None:
        """Update with a shallow copy of ``batch`` whose score field (the first of ``fields``) is mapped."""
        scores = getattr(batch, self.fields[0], None)
        if scores is not None:
            batch = copy.copy(batch)
            setattr(batch, self.fields[0], unit_interval(scores))
        super().update(batch, *args, **kwargs)  # type: ignore[misc]


class AUROC(_RankedScores, anomalib_metrics.AUROC):
    """anomalib's ``AUROC`` on raw scores of any range (same class name: the evaluator reports ``image_AUROC``)."""


class F1Max(_RankedScores, anomalib_metrics.F1Max):
    """anomalib's ``F1Max`` on raw scores of any range (its threshold is then on the mapped scale)."""


def make_evaluator() -> anomalib_metrics.Evaluator:
    """AUROC and F1 at the F1-optimal threshold per level on the raw scores and maps, and AUPRO.

    AUPRO takes its thresholds over the maps' own range and needs no mapping.
    """
    return anomalib_metrics.Evaluator(
        test_metrics=[
            AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
            F1Max(fields=["pred_score", "gt_label"], prefix="image_"),
            AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
            F1Max(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
            anomalib_metrics.AUPRO(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
        ],
    )
