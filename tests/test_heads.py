"""The auxiliary heads against the paper's description, and what they can fit; the loss's default weights."""

import kornia
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from anomalib_apc.models import AnomalousPatchCore
from anomalib_apc.models.apc.heads import ClassificationHead, ReconstructionHead, SegmentationHead
from anomalib_apc.models.apc.torch_model import FineTuneOutput

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]


def layer_kinds(head: nn.Module) -> list[str]:
    """The head's layers, in order, by what the paper calls them (containers left out)."""
    names = {
        nn.Conv2d: "conv",
        nn.ConvTranspose2d: "tconv",
        kornia.filters.GaussianBlur2d: "gaussian",
        nn.ReLU: "act",
        nn.LeakyReLU: "act",
        nn.MaxPool2d: "pool",
        nn.Linear: "fc",
    }
    return [names[type(module)] for module in head.modules() if type(module) in names]


def test_classification_head_is_three_conv_act_pool_blocks_then_two_fully_connected_layers() -> None:
    kinds = layer_kinds(ClassificationHead(64))
    assert kinds == ["conv", "act", "pool"] * 3 + ["fc", "act", "fc"]


def test_segmentation_head_is_tconv_gaussian_conv() -> None:
    assert layer_kinds(SegmentationHead(64)) == ["tconv", "gaussian", "conv"]


def test_reconstruction_head_is_tconv_then_twice_gaussian_conv_with_an_activation_between() -> None:
    assert layer_kinds(ReconstructionHead(64)) == ["tconv", "gaussian", "conv", "act", "gaussian", "conv"]


def test_heads_output_what_the_losses_expect() -> None:
    features = torch.randn(2, 64, 8, 8, generator=torch.Generator().manual_seed(0))
    assert ClassificationHead(64)(features).shape == (2,)
    assert SegmentationHead(64)(features).shape == (2, 1, 16, 16)
    assert ReconstructionHead(64)(features).shape == (2, 3, 16, 16)


def test_reconstruction_head_fits_dark_pixels_as_well_as_bright_ones() -> None:
    """The target is the ImageNet-normalised image: dark pixels are negative and must be reachable.

    With a LeakyReLU at the end (the old head) the MSE on negative-target pixels stayed about 5 times
    the MSE on positive ones after the same steps; without it both are about equal.
    """
    generator = torch.Generator().manual_seed(0)
    smooth = F.interpolate(torch.rand(2, 3, 4, 4, generator=generator), size=(32, 32), mode="bicubic").clamp(0, 1)
    target = (smooth - IMAGENET_MEAN) / IMAGENET_STD
    negative = target < 0
    assert 0.2 < negative.float().mean() < 0.8
    features = torch.randn(2, 64, 16, 16, generator=generator)
    torch.manual_seed(0)
    head = ReconstructionHead(64)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-2)
    for _ in range(100):
        loss = F.mse_loss(head(features), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        squared_error = (head(features) - target) ** 2
    assert squared_error[negative].mean() < 2 * squared_error[~negative].mean()
    assert squared_error.mean() < 0.1 * target.var()  # and it did learn the image


def test_default_loss_is_ten_classification_plus_segmentation_plus_reconstruction() -> None:
    model = AnomalousPatchCore(backbone="resnet18", pre_trained=False)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 16, 16, generator=generator)
    outputs = FineTuneOutput(
        classification=torch.tensor([0.3, -1.2]),
        segmentation=torch.randn(2, 1, 8, 8, generator=generator),
        reconstruction=torch.randn(2, 3, 8, 8, generator=generator),
    )
    labels = torch.tensor([0, 1])
    masks = torch.zeros(2, 16, 16)
    masks[1, 4:9, 2:12] = 1
    classification = F.binary_cross_entropy_with_logits(outputs.classification, labels.float())
    segmentation = F.binary_cross_entropy_with_logits(
        F.interpolate(outputs.segmentation, size=(16, 16), mode="bilinear"), masks[:, None]
    )
    reconstruction = F.mse_loss(F.interpolate(outputs.reconstruction, size=(16, 16), mode="bilinear"), images)
    terms = model.loss(outputs, images, labels, masks)
    assert terms["classification"] == pytest.approx(float(classification), rel=1e-6)
    assert terms["segmentation"] == pytest.approx(float(segmentation), rel=1e-6)
    assert terms["reconstruction"] == pytest.approx(float(reconstruction), rel=1e-6)
    assert terms["total"] == pytest.approx(float(10 * classification + segmentation + reconstruction), rel=1e-6)
