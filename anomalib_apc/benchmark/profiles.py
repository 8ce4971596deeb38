"""The settings a benchmark takes where the user chooses none, per kind of dataset.

The demo runs on pretrained features that install from the package registry, over three seeds;
real data gets the paper's ResNet-50, 256 px and 50 epochs. Imports nothing heavy.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Profile:
    """The settings used when the user does not choose them, per kind of dataset.

    ``layers`` and ``init_weights`` belong to ``backbone``: they apply only while the backbone is the
    profile's (another backbone gets its ``DEFAULT_LAYERS`` and the ``pre_trained`` hub weights).
    """

    backbone: str
    image_size: int
    finetune_epochs: int
    layers: tuple[str, ...] = ("layer2", "layer3")
    init_weights: str | None = None
    seeds: tuple[int, ...] = (0,)


DEFAULT_LAYERS = ("layer2", "layer3")
"""Memory-bank stages of a backbone that no profile describes: ResNet's ``layer2`` + ``layer3``, as PatchCore."""

DEMO_PROFILE = Profile(
    backbone="vgg16_bn",
    image_size=128,
    finetune_epochs=5,
    layers=("features.22", "features.32"),
    init_weights="craft-vgg16-bn",
    seeds=(0, 1, 2),
)
"""For the demo dataset: pretrained features that install from the package registry (CRAFT's VGG16-BN trunk,
conv3_3 + conv4_3), three seeds for a spread; Patchcore and APC both finish in about 5 minutes on a 2-core CPU."""

PAPER_PROFILE = Profile(backbone="resnet50", image_size=256, finetune_epochs=50)
"""For real data (MVTec AD, one folder in its layout): the paper's ResNet-50 and 50 epochs, at anomalib's 256 px."""
