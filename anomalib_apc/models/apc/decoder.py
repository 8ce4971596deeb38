"""U-Net decoder of APC's fine-tuning network.

Reading of the paper used here (see README, "Architecture"): the deepest encoder stage is the
bottleneck; one transposed-convolution block per skip connection upsamples and joins a skip, deep
to shallow. ``unet2`` takes skips from the memory-bank stages (layer3, then layer2 for ResNets:
Tconv1 and Tconv2 of the paper), ``unet4`` adds the two next shallower stages (layer1 and the stem).
While the output is still coarser than stride 4, plain upsampling blocks follow (Tconv3 in
``unet2``), so the pixel heads always start from stride 4 or finer. Widths come from the encoder's
``feature_info``: a block joining a skip of C channels outputs C // 2 channels.
"""

from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
from torch import nn

from anomalib_apc.errors import check_choice

DecoderType = Literal["unet2", "unet4"]
EXTRA_SKIPS = {"unet2": 0, "unet4": 2}
PIXEL_HEAD_MAX_REDUCTION = 4
MIN_CHANNELS = 32


class DecoderOutput(NamedTuple):
    """Decoder features consumed by the heads."""

    classification_features: torch.Tensor
    """Output of the block that joined the shallowest memory-bank stage (Tconv2)."""
    pixel_features: torch.Tensor
    """Final output, shared by the segmentation and reconstruction heads (Tconv3)."""


def conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """3x3 convolution, batch norm and ReLU: the decoder's basic unit."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class UpBlock(nn.Module):
    """Transposed convolution upsampling by ``scale``, optionally joined with a skip connection."""

    def __init__(self, in_channels: int, out_channels: int, scale: int, skip_channels: int = 0) -> None:
        super().__init__()
        self.upsample = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=scale, stride=scale)
        self.fuse = conv_bn_relu(out_channels + skip_channels, out_channels)

    def forward(self, features: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        """Upsample ``features`` and fuse them with ``skip`` (same spatial size after upsampling)."""
        upsampled = self.upsample(features)
        if skip is not None:
            if upsampled.shape[-2:] != skip.shape[-2:]:
                upsampled = nn.functional.interpolate(upsampled, size=skip.shape[-2:], mode="bilinear")
            upsampled = torch.cat([upsampled, skip], dim=1)
        return self.fuse(upsampled)


class UNetDecoder(nn.Module):
    """Decoder from the deepest encoder stage back to stride 4 (or finer), with skip connections.

    Args:
        stage_channels: Channels of every encoder stage, shallow to deep (timm ``feature_info``).
        stage_reductions: Stride of every encoder stage, shallow to deep.
        memory_bank_indices: Stage indices of the memory-bank layers.
        decoder: ``"unet2"`` (skips from the memory-bank stages) or ``"unet4"`` (two more).
    """

    def __init__(
        self,
        stage_channels: Sequence[int],
        stage_reductions: Sequence[int],
        memory_bank_indices: Sequence[int],
        decoder: DecoderType = "unet2",
    ) -> None:
        super().__init__()
        check_choice("decoder", decoder, sorted(EXTRA_SKIPS))
        bottleneck = len(stage_channels) - 1
        bank_skips = sorted((index for index in set(memory_bank_indices) if index != bottleneck), reverse=True)
        shallowest_bank = min(memory_bank_indices)
        extra_skips = list(range(shallowest_bank - 1, max(shallowest_bank - 1 - EXTRA_SKIPS[decoder], -1), -1))
        self.skip_indices: list[int] = bank_skips + extra_skips
        # The classification head reads the block that joined the shallowest memory-bank stage, or the
        # bottleneck itself when that stage is the deepest one.
        self.classification_stage = shallowest_bank

        blocks = []
        channels, reduction = stage_channels[bottleneck], stage_reductions[bottleneck]
        self.classification_channels = channels
        for index in self.skip_indices:
            out_channels = max(stage_channels[index] // 2, MIN_CHANNELS)
            scale = max(reduction // stage_reductions[index], 1)
            blocks.append(UpBlock(channels, out_channels, scale, skip_channels=stage_channels[index]))
            channels, reduction = out_channels, stage_reductions[index]
            if index == self.classification_stage:
                self.classification_channels = channels
        self.skip_blocks = nn.ModuleList(blocks)

        upsampling = []
        while reduction > PIXEL_HEAD_MAX_REDUCTION:
            out_channels = max(channels // 2, MIN_CHANNELS)
            upsampling.append(UpBlock(channels, out_channels, scale=2))
            channels, reduction = out_channels, reduction // 2
        self.upsampling_blocks = nn.ModuleList(upsampling)
        self.pixel_channels = channels

    def forward(self, stages: Sequence[torch.Tensor]) -> DecoderOutput:
        """Decode the list of encoder stage features (shallow to deep)."""
        features = stages[-1]
        classification_features = features
        for stage_index, block in zip(self.skip_indices, self.skip_blocks, strict=True):
            features = block(features, stages[stage_index])
            if stage_index == self.classification_stage:
                classification_features = features
        for block in self.upsampling_blocks:
            features = block(features)
        return DecoderOutput(classification_features=classification_features, pixel_features=features)
