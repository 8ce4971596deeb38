"""APC's fine-tuning loss: L = w_cls * BCE(label) + w_seg * pixel BCE(mask) + w_rec * MSE(image)."""

from collections.abc import Mapping

import torch
from torch import nn
from torch.nn import functional as F

from .torch_model import FineTuneOutput


class ApcLoss(nn.Module):
    """Weighted sum of the enabled tasks' losses, with each term kept for logging.

    The segmentation head outputs logits, so the pixel-wise BCE is computed with logits (the same
    as sigmoid + BCE, numerically stable). Pixel outputs are resized to the image size first. Head
    outputs are cast to float32 first: under bfloat16 autocast the sums over every pixel of a batch
    would otherwise lose most of their digits.

    Args:
        weights: Weight per task name; only tasks whose output is present contribute.
    """

    def __init__(self, weights: Mapping[str, float]) -> None:
        super().__init__()
        self.weights = dict(weights)

    def forward(
        self,
        outputs: FineTuneOutput,
        images: torch.Tensor,
        labels: torch.Tensor,
        masks: torch.Tensor | None,
    ) -> dict[str, torch.Tensor]:
        """Per-task losses and their weighted ``total``.

        Args:
            outputs: Head outputs of the fine-tuning network.
            images: The (pre-processed) input images, target of the reconstruction.
            labels: Image labels, 1 for anomalous.
            masks: Ground-truth defect masks ``(B, H, W)`` or ``(B, 1, H, W)``; needed for segmentation.
        """
        terms: dict[str, torch.Tensor] = {}
        size = images.shape[-2:]
        if outputs.classification is not None:
            terms["classification"] = F.binary_cross_entropy_with_logits(outputs.classification.float(), labels.float())
        if outputs.segmentation is not None:
            target = masks.float().reshape(images.shape[0], 1, *masks.shape[-2:])
            if target.shape[-2:] != size:
                target = F.interpolate(target, size=size, mode="nearest")
            logits = F.interpolate(outputs.segmentation.float(), size=size, mode="bilinear")
            terms["segmentation"] = F.binary_cross_entropy_with_logits(logits, target)
        if outputs.reconstruction is not None:
            reconstruction = F.interpolate(outputs.reconstruction.float(), size=size, mode="bilinear")
            terms["reconstruction"] = F.mse_loss(reconstruction, images)
        terms["total"] = sum(self.weights[task] * value for task, value in terms.items())
        return terms
