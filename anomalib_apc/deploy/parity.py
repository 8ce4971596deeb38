"""How closely a bundle reproduces the PyTorch model it was exported from, on the same images."""

from dataclasses import asdict, dataclass

import torch

from anomalib_apc.models import AnomalousPatchCore

from .inferencer import ApcInferencer


@dataclass(frozen=True)
class ParityReport:
    """Differences between bundle and model on the same pre-processed images.

    Attributes:
        images: Images compared.
        max_relative_score_difference: Largest ``|bundle - model| / |model|`` of the raw image scores.
        max_relative_anomaly_map_difference: Largest absolute difference of the raw anomaly maps,
            divided by the largest value of the model's maps.
        labels_equal: Whether all predicted labels agree (``None`` without a post-processor).
        max_normalized_score_difference: Largest difference of the post-processed scores in
            ``[0, 1]`` (``None`` without a post-processor).
    """

    images: int
    max_relative_score_difference: float
    max_relative_anomaly_map_difference: float
    labels_equal: bool | None
    max_normalized_score_difference: float | None

    def as_dict(self) -> dict[str, float | int | bool | None]:
        return asdict(self)

    def summary(self) -> str:
        labels = "n/a" if self.labels_equal is None else ("identical" if self.labels_equal else "DIFFERENT")
        return (
            f"{self.images} images: scores within {self.max_relative_score_difference:.2e} relative, "
            f"anomaly maps within {self.max_relative_anomaly_map_difference:.2e} of their peak, labels {labels}"
        )


@torch.no_grad()
def compare_with_model(inferencer: ApcInferencer, model: AnomalousPatchCore, images: torch.Tensor) -> ParityReport:
    """Run ``images`` (RGB ``(B, 3, H, W)`` in ``[0, 1]``) through both and compare raw and post-processed outputs.

    Both get the inferencer's pre-processed tensors, so the comparison covers the graph, the search,
    the scoring and the post-processing; the pre-processor is anomalib's own on both sides.
    """
    model.eval()
    model_inputs = inferencer.prepare(images).model_inputs
    reference = model.model(model_inputs)
    bundle = inferencer.score(model_inputs)
    score_difference = (bundle.pred_score - reference.pred_score).abs() / reference.pred_score.abs().clamp_min(1e-12)
    map_peak = reference.anomaly_map.abs().max().clamp_min(1e-12)
    map_difference = (bundle.anomaly_map - reference.anomaly_map).abs().max() / map_peak
    labels_equal = normalized_difference = None
    if model.post_processor is not None and inferencer.post_processor is not None:
        reference_processed, bundle_processed = model.post_processor(reference), inferencer.post_process(bundle)
        labels_equal = bool(torch.equal(reference_processed.pred_label, bundle_processed.pred_label))
        normalized_difference = float((reference_processed.pred_score - bundle_processed.pred_score).abs().max())
    return ParityReport(
        images=len(model_inputs),
        max_relative_score_difference=float(score_difference.max()),
        max_relative_anomaly_map_difference=float(map_difference),
        labels_equal=labels_equal,
        max_normalized_score_difference=normalized_difference,
    )
