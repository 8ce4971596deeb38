"""The paper's basic augmentations of the fine-tuning images: flips, a small affine warp, colour jitter.

APC's paper (Table 6) fine-tunes on augmented images; without them the few real anomalies are seen
in exactly one pose. The geometric part moves the image and its defect mask alike (the mask with
nearest-neighbour resampling), the colour part changes the image only. Strengths are modest, as fits
industrial images taken under a fixed camera and light: a part may be mirrored or turned slightly,
its brightness and contrast vary a little, but it never becomes another part.

Randomness comes from a ``torch.Generator`` the caller passes in (see :mod:`.seeded_kornia`), so an
augmented sample is reproducible from its sample seed.
"""

import torch
from kornia.augmentation import (
    AugmentationSequential,
    ColorJiggle,
    RandomAffine,
    RandomHorizontalFlip,
    RandomVerticalFlip,
)

from anomalib_apc.data.seeded_kornia import kornia_draws_from


class BasicAugmentation:
    """Random flips, a small rotation / translation / scaling and colour jitter of an image and its mask.

    Args:
        flip_probability: Probability of a horizontal flip, and independently of a vertical one.
        rotation_degrees: Largest rotation, either way.
        translation: Largest shift, as a fraction of the image's width and height.
        scale: Range of the zoom factor.
        brightness: Strength of the brightness jitter (kornia ``ColorJiggle``).
        contrast: Strength of the contrast jitter.
        saturation: Strength of the saturation jitter.

    The warp fills the borders by reflection, so no black corners appear that a model could take
    for defects; the mask is reflected with the image, so it stays aligned.

    Example:
        >>> augmentation = BasicAugmentation()
        >>> image, mask = torch.rand(3, 32, 32), torch.zeros(32, 32, dtype=torch.bool)
        >>> new_image, new_mask = augmentation(image, mask, torch.Generator().manual_seed(0))
        >>> new_image.shape, new_mask.dtype
        (torch.Size([3, 32, 32]), torch.bool)
    """

    def __init__(
        self,
        flip_probability: float = 0.5,
        rotation_degrees: float = 10.0,
        translation: float = 0.05,
        scale: tuple[float, float] = (0.95, 1.05),
        brightness: float = 0.1,
        contrast: float = 0.1,
        saturation: float = 0.1,
    ) -> None:
        self.augmentation = AugmentationSequential(
            RandomHorizontalFlip(p=flip_probability),
            RandomVerticalFlip(p=flip_probability),
            RandomAffine(
                degrees=rotation_degrees,
                translate=(translation, translation),
                scale=scale,
                padding_mode="reflection",
                p=1.0,
            ),
            ColorJiggle(brightness=brightness, contrast=contrast, saturation=saturation, p=1.0),
            data_keys=["input", "mask"],
        )

    def __call__(
        self, image: torch.Tensor, mask: torch.Tensor | None, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Augment a ``(C, H, W)`` image in ``[0, 1]`` and its ``(H, W)`` (or ``(1, H, W)``) mask alike.

        Returns the image in its dtype and the mask as a boolean ``(H, W)`` tensor (``None`` stays ``None``).
        """
        pixels = image.as_subclass(torch.Tensor)[None].float()
        if mask is None:
            mask_pixels = torch.zeros(1, 1, *pixels.shape[-2:])
        else:
            mask_pixels = mask.as_subclass(torch.Tensor).reshape(1, 1, *mask.shape[-2:]).float()
        with kornia_draws_from(generator):
            augmented, augmented_mask = self.augmentation(pixels, mask_pixels)
        augmented = augmented[0].clamp(0, 1).to(image.dtype)
        return augmented, None if mask is None else augmented_mask[0, 0] > 0.5
