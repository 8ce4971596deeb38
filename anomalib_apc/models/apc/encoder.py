"""The timm CNN that APC fine-tunes and PatchCore then reads.

One module serves both uses so that both see the same weights: the fine-tuning network needs every
stage (the decoder starts from the deepest one and takes skips from the others), while the memory
bank, inference and the deployment graph only need the stages up to the deepest memory-bank layer,
so that forward stops early there.

The batch-norm control (``finetune_scope="batchnorm_statistics"``) is the encoder's own forward pass
in train mode without gradients (:meth:`TimmEncoder.adapt_batchnorm_statistics`): batch norm updates
its running statistics in the forward pass, so they adapt exactly as in full fine-tuning while no
weight can change.
"""

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from anomalib_apc.errors import InvalidInputError

from .init_weights import create_encoder_backbone
from .precision import finetune_autocast


class TimmEncoder(nn.Module):
    """A timm CNN exposing its feature stages by their ``feature_info`` module names.

    Args:
        backbone: timm model name; any CNN with ``feature_info`` and ``forward_intermediates``.
        memory_bank_layers: Names of the stages whose features feed the memory bank.
        pre_trained: Load timm's ImageNet weights (see ``create_encoder_backbone``).
        init_weights: Local checkpoint file to initialise from instead.
        init_weights_key_map: Regex -> replacement pairs for the checkpoint's key names.
    """

    def __init__(
        self,
        backbone: str,
        memory_bank_layers: Sequence[str],
        pre_trained: bool = False,
        init_weights: str | Path | None = None,
        init_weights_key_map: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__()
        self.model = create_encoder_backbone(backbone, pre_trained, init_weights, init_weights_key_map)
        self.stage_names: list[str] = [info["module"] for info in self.model.feature_info]
        self.stage_channels: list[int] = [info["num_chs"] for info in self.model.feature_info]
        self.stage_reductions: list[int] = [info["reduction"] for info in self.model.feature_info]
        unknown = [layer for layer in memory_bank_layers if layer not in self.stage_names]
        if unknown or len(memory_bank_layers) == 0:
            msg = (
                f"layers {list(memory_bank_layers)} are not feature stages of {backbone!r}; "
                f"choose from {self.stage_names}."
            )
            raise InvalidInputError(msg)
        self.memory_bank_layers = list(memory_bank_layers)
        self.memory_bank_indices = [self.stage_names.index(layer) for layer in self.memory_bank_layers]

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Features of the memory-bank stages only, stopping after the deepest of them."""
        features = self.model.forward_intermediates(
            images,
            indices=self.memory_bank_indices,
            intermediates_only=True,
            stop_early=True,
        )
        return dict(zip(self.memory_bank_layers, features, strict=True))

    def forward_all_stages(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Features of every stage, shallow to deep, for the fine-tuning decoder."""
        return self.model.forward_intermediates(
            images,
            indices=list(range(len(self.stage_names))),
            intermediates_only=True,
        )

    @torch.no_grad()
    def adapt_batchnorm_statistics(self, images: torch.Tensor, precision: str, channels_last: bool) -> None:
        """One fine-tuning step's forward pass through every stage, in the current mode, without gradients.

        In train mode batch norm updates its running statistics as full fine-tuning would; no weight changes.
        """
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with finetune_autocast(precision, images.device):
            self.forward_all_stages(images)
