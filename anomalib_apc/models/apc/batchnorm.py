"""Batch-norm statistics: adapted to the fine-tuning batches without weight updates (the control), and
re-estimated on the real normal training images after fine-tuning.

The control (``finetune_scope="batchnorm_statistics"``, :func:`adapt_batchnorm_statistics`) runs the
encoder's forward pass of each fine-tuning step in train mode without gradients: batch norm updates
its running statistics in the forward pass, so they adapt exactly as in full fine-tuning while no
weight can change.

Fine-tuning sees balanced batches, half of them anomalous or CutPaste, so the encoder's batch-norm
running means and variances describe that mixture rather than the normal images the memory bank is
built from and the mostly normal test images. Re-estimating them on the normal training images
before phase 2 makes the memory bank and the test see the same normalisation; no weight changes.

PyTorch's own ``torch.optim.swa_utils.update_bn`` does the pass (statistics reset, cumulative
average over one pass, modes restored).
"""

from collections.abc import Iterable, Iterator

import torch
from torch import nn
from torch.optim.swa_utils import update_bn

from .encoder import TimmEncoder
from .precision import finetune_autocast


@torch.no_grad()
def adapt_batchnorm_statistics(encoder: TimmEncoder, images: torch.Tensor, precision: str,
                               channels_last: bool) -> None:
    """The encoder's forward pass of one fine-tuning step, in train mode, without gradients (the control)."""
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with finetune_autocast(precision, images.device):
        encoder.forward_all_stages(images)


class _AllStages(nn.Module):
    """The encoder through every stage, so that every batch-norm layer sees data during ``update_bn``.

    The memory bank only reads the stages up to its deepest layer, but the decoder and the
    segmentation head (``segmentation_fusion``) read the deeper ones too: ``update_bn`` resets every
    batch-norm layer of the module it is given, so each must be reached by the pass.
    """

    def __init__(self, encoder: TimmEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.encoder.forward_all_stages(images)


def reestimate_batchnorm_statistics(
    encoder: TimmEncoder,
    images: Iterable[torch.Tensor],
    transform: nn.Module | None,
    device: torch.device,
) -> None:
    """Replace the running statistics of every batch-norm layer of ``encoder`` by those of ``images``.

    Args:
        encoder: The fine-tuned encoder; its train/eval mode is kept.
        images: Raw batches of the real normal training images (all of them, on every DDP rank, so
            that every rank computes the same statistics without communicating).
        transform: The pre-processor's transform applied to each raw batch, if any.
        device: Where the pass runs.
    """

    def prepared() -> Iterator[torch.Tensor]:
        for batch in images:
            batch = batch.to(device)
            yield transform(batch) if transform else batch

    all_stages = _AllStages(encoder)
    all_stages.train(encoder.training)  # update_bn restores the mode of the module it is given
    update_bn(prepared(), all_stages)
