"""APC's fine-tuning loss: L = w_cls * BCE(label) + w_seg * pixel BCE(mask) + w_rec * MSE(image).

The segmentation term uses what each image's annotation (:class:`~anomalib_apc.contracts.Annotation`)
says and nothing more:

- a mask (or a normal image): every pixel is a target, as in the paper;
- boxes: pixels outside every box are normal targets; inside, ``box_supervision`` decides: ``"ignore"``
  leaves them out of the loss, ``"soft"`` gives them the target :data:`BOX_SOFT_TARGET` (defect and
  background alike likely: a defect fills part of its box);
- the label alone: no pixel is a target; ``label_supervision="max"`` adds the multiple-instance
  term BCE(max of the image's logits, 1): somewhere in a defective image the head must see a defect.

The pixel BCE is averaged over the pixels that are targets, so a batch of masks gives the paper's
mean over every pixel.
"""

from collections.abc import Mapping
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from anomalib_apc.contracts import Annotation
from anomalib_apc.errors import check_choice

from .torch_model import FineTuneOutput

BoxSupervision = Literal["ignore", "soft"]
BOX_SUPERVISIONS: tuple[str, ...] = ("ignore", "soft")
LabelSupervision = Literal["none", "max"]
LABEL_SUPERVISIONS: tuple[str, ...] = ("none", "max")
BOX_SOFT_TARGET = 0.5
"""The target of pixels inside a box under ``box_supervision="soft"``: as likely defect as not."""


class ApcLoss(nn.Module):
    """Weighted sum of the enabled tasks' losses, with each term kept for logging.

    The segmentation head outputs logits, so the pixel-wise BCE is computed with logits (the same
    as sigmoid + BCE, numerically stable). Pixel outputs are resized to the image size first. Head
    outputs are cast to float32 first: under bfloat16 autocast the sums over every pixel of a batch
    would otherwise lose most of their digits.

    Args:
        weights: Weight per task name; only tasks whose output is present contribute.
        box_supervision: What the pixels inside a box are for the segmentation loss (module docstring).
        label_supervision: Whether an image known by its label alone adds the max-logit term.

    Raises:
        InvalidInputError: An unknown ``box_supervision`` or ``label_supervision``.
    """

    def __init__(
        self,
        weights: Mapping[str, float],
        box_supervision: BoxSupervision = "ignore",
        label_supervision: LabelSupervision = "none",
    ) -> None:
        super().__init__()
        check_choice("box_supervision", box_supervision, BOX_SUPERVISIONS)
        check_choice("label_supervision", label_supervision, LABEL_SUPERVISIONS)
        self.weights = dict(weights)
        self.box_supervision = box_supervision
        self.label_supervision = label_supervision

    def forward(
        self,
        outputs: FineTuneOutput,
        images: torch.Tensor,
        labels: torch.Tensor,
        masks: torch.Tensor | None,
        annotations: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-task losses and their weighted ``total``.

        Args:
            outputs: Head outputs of the fine-tuning network.
            images: The (pre-processed) input images, target of the reconstruction.
            labels: Image labels, 1 for anomalous.
            masks: Ground-truth defect masks ``(B, H, W)`` or ``(B, 1, H, W)`` (the boxes' union for box
                annotations); needed for segmentation.
            annotations: One ``Annotation`` value per image; ``None``: every image has its mask.
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
            terms["segmentation"] = self.segmentation_loss(logits, target, annotations)
        if outputs.reconstruction is not None:
            reconstruction = F.interpolate(outputs.reconstruction.float(), size=size, mode="bilinear")
            terms["reconstruction"] = F.mse_loss(reconstruction, images)
        terms["total"] = sum(self.weights[task] * value for task, value in terms.items())
        return terms

    def segmentation_loss(
        self, logits: torch.Tensor, target: torch.Tensor, annotations: torch.Tensor | None
    ) -> torch.Tensor:
        """Pixel BCE over the pixels each image's annotation makes targets, plus the max-logit term (see above)."""
        if annotations is None:
            return F.binary_cross_entropy_with_logits(logits, target)
        per_image = annotations.to(logits.device).reshape(-1, 1, 1, 1)
        in_box = (per_image == Annotation.BOX) & (target > 0)
        weight = torch.ones_like(target)
        weight[(per_image == Annotation.LABEL).expand_as(target)] = 0.0
        if self.box_supervision == "ignore":
            weight[in_box] = 0.0
        else:
            target = target.masked_fill(in_box, BOX_SOFT_TARGET)
        per_pixel = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        loss = (per_pixel * weight).sum() / weight.sum().clamp_min(1.0)
        label_only = annotations.to(logits.device) == Annotation.LABEL
        if self.label_supervision == "max" and bool(label_only.any()):
            top_logits = logits[label_only].flatten(1).amax(dim=1)
            loss = loss + F.binary_cross_entropy_with_logits(top_logits, torch.ones_like(top_logits))
        return loss
