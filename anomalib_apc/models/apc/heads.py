"""The three auxiliary heads of APC's fine-tuning network (classification, segmentation, reconstruction).

They exist only to shape the encoder's features during fine-tuning and are dropped afterwards.
Gaussian smoothing comes from kornia. The pixel heads return logits / unbounded values at their own
resolution; the loss brings them to the image size.
"""

import kornia
import torch
from torch import nn

SMOOTHING_KERNEL = (5, 5)
SMOOTHING_SIGMA = (1.0, 1.0)
IMAGE_CHANNELS = 3


def gaussian_smoothing() -> nn.Module:
    """The fixed Gaussian filter used by both pixel heads."""
    return kornia.filters.GaussianBlur2d(SMOOTHING_KERNEL, SMOOTHING_SIGMA)


class ClassificationHead(nn.Module):
    """Normal vs anomalous image: three (conv, ReLU, max-pool) blocks, then two fully connected layers.

    Global average pooling sits between the blocks and the fully connected layers so that the head
    accepts any image size.

    Args:
        in_channels: Channels of the decoder features it reads (Tconv2 output).
        conv_channels: Output channels of the three convolution blocks.
        hidden_features: Width of the first fully connected layer.
    """

    def __init__(
        self, in_channels: int, conv_channels: tuple[int, int, int] = (128, 64, 32), hidden_features: int = 32
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for out_channels in conv_channels:
            layers += [
                nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(kernel_size=2, ceil_mode=True),
            ]
            in_channels = out_channels
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Sequential(
            nn.Linear(in_channels, hidden_features),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_features, 1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Anomaly logit per image, shape ``(B,)``."""
        return self.classifier(self.features(features)).squeeze(1)


def upsample_smooth_conv(in_channels: int, out_channels: int) -> list[nn.Module]:
    """The start both pixel heads share: transposed convolution (x2), Gaussian smoothing, 3x3 convolution."""
    hidden = max(in_channels // 2, 16)
    return [
        nn.ConvTranspose2d(in_channels, hidden, kernel_size=2, stride=2),
        gaussian_smoothing(),
        nn.Conv2d(hidden, out_channels, kernel_size=3, padding=1),
    ]


class SegmentationHead(nn.Module):
    """Defect mask: transposed convolution, Gaussian smoothing, convolution (sigmoid in the loss)."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(*upsample_smooth_conv(in_channels, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Mask logits, shape ``(B, 1, h, w)``."""
        return self.layers(features)


class ReconstructionHead(nn.Module):
    """Input image: transposed convolution, then twice (Gaussian smoothing, convolution), LeakyReLU between.

    The paper ends both blocks in a LeakyReLU; here the last convolution is the output, with no
    activation after it. The target is the pre-processed image, normalised with ImageNet's mean and
    standard deviation, so about a fifth of its pixels (every dark one) are negative and its range is
    roughly [-2.1, 2.6]. A final LeakyReLU maps negatives to a hundredth of their size: the head could
    then only fit the dark pixels with huge pre-activations, and its loss would be spent there
    (measured: MSE four times higher on negative-target pixels than on positive ones). A sigmoid
    would need a [0, 1] target instead, i.e. undoing the normalisation; an unbounded output fits the
    normalised target as it is.
    """

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        hidden = max(in_channels // 2, 16)
        self.layers = nn.Sequential(
            *upsample_smooth_conv(in_channels, hidden),
            nn.LeakyReLU(inplace=True),
            gaussian_smoothing(),
            nn.Conv2d(hidden, IMAGE_CHANNELS, kernel_size=3, padding=1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Reconstructed (normalised) image, shape ``(B, 3, h, w)``."""
        return self.layers(features)
