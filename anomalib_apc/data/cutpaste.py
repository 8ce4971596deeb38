"""CutPaste with real defects: synthetic anomalies for supervised fine-tuning.

APC fine-tunes its feature extractor on a handful of real anomalies. To see more varied anomalous
samples than those few images, the defect region of a real anomaly (taken through its ground-truth
mask) is cut out, jittered in colour, flipped and rotated, and pasted at a random place of a normal
image. The pasted pixels become the new ground-truth mask.

The operation works on tensors of any device; randomness comes from a ``torch.Generator`` the caller
passes in, so a sample is reproducible from its seed whatever process or worker makes it.
"""

import math

import torch
import torch.nn.functional as F
from kornia.augmentation import (
    AugmentationSequential,
    ColorJiggle,
    RandomHorizontalFlip,
    RandomRotation,
    RandomVerticalFlip,
)

from anomalib_apc.data.seeded_kornia import kornia_draws_from
from anomalib_apc.errors import InvalidInputError


class CutPaste:
    """Paste the defect region of an anomalous image onto a normal image.

    Args:
        brightness: Strength of the brightness jitter of the pasted patch (kornia ``ColorJiggle``).
        saturation: Strength of the saturation jitter of the pasted patch.
        rotation_degrees: The patch is rotated by an angle drawn from ``[-rotation_degrees, rotation_degrees]``;
            together with the random horizontal and vertical flips, 90 covers every orientation.

    Example:
        >>> cutpaste = CutPaste()
        >>> normal, defect = torch.rand(3, 64, 64), torch.rand(3, 64, 64)
        >>> defect_mask = torch.zeros(64, 64, dtype=torch.bool)
        >>> defect_mask[10:20, 30:40] = True
        >>> image, mask = cutpaste(normal, defect, defect_mask, torch.Generator().manual_seed(0))
        >>> image.shape, mask.dtype
        (torch.Size([3, 64, 64]), torch.bool)
    """

    def __init__(self, brightness: float = 0.2, saturation: float = 0.5, rotation_degrees: float = 90.0) -> None:
        self.color_jitter = ColorJiggle(brightness=brightness, saturation=saturation, p=1.0)
        self.geometric = AugmentationSequential(
            RandomHorizontalFlip(p=0.5),
            RandomVerticalFlip(p=0.5),
            RandomRotation(degrees=rotation_degrees, p=1.0),
            data_keys=["input", "mask"],
        )

    def __call__(
        self,
        normal_image: torch.Tensor,
        defect_image: torch.Tensor,
        defect_mask: torch.Tensor,
        generator: torch.Generator,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``normal_image`` with the jittered defect pasted in, and the mask of the pasted pixels.

        Args:
            normal_image: ``(C, H, W)`` float image in ``[0, 1]`` that receives the defect.
            defect_image: ``(C, h, w)`` float image in ``[0, 1]`` holding a real defect; it may differ in size.
            defect_mask: ``(h, w)`` or ``(1, h, w)`` mask of ``defect_image``; non-zero marks the defect.
            generator: CPU generator that decides jitter, flips, rotation and paste location.

        Returns:
            The new image ``(C, H, W)`` and a boolean ``(H, W)`` mask that is true exactly on the pasted
            pixels. A patch larger than the normal image is cut to the normal image's size.

        Raises:
            InvalidInputError: If ``defect_mask`` marks no pixel (there is no defect to cut) or its size differs
                from ``defect_image``.
        """
        defect_mask = defect_mask.reshape(defect_mask.shape[-2:]).bool()
        if defect_mask.shape != defect_image.shape[-2:]:
            msg = (
                f"Defect mask of size {tuple(defect_mask.shape)} does not match its image of "
                f"{tuple(defect_image.shape)}."
            )
            raise InvalidInputError(msg)
        if not defect_mask.any():
            msg = "Defect mask is empty: there is no defect region to cut."
            raise InvalidInputError(msg)

        patch, patch_mask = self._augmented_patch(defect_image, defect_mask, generator)
        patch_height = min(patch.shape[-2], normal_image.shape[-2])
        patch_width = min(patch.shape[-1], normal_image.shape[-1])
        patch = patch[:, :patch_height, :patch_width].to(normal_image.device, normal_image.dtype)
        patch_mask = patch_mask[:patch_height, :patch_width].to(normal_image.device)

        top = int(torch.randint(normal_image.shape[-2] - patch_height + 1, (), generator=generator))
        left = int(torch.randint(normal_image.shape[-1] - patch_width + 1, (), generator=generator))
        rows, columns = slice(top, top + patch_height), slice(left, left + patch_width)

        image = normal_image.clone()
        image[:, rows, columns] = torch.where(patch_mask, patch, image[:, rows, columns])
        mask = torch.zeros(normal_image.shape[-2:], dtype=torch.bool, device=normal_image.device)
        mask[rows, columns] = patch_mask
        return image, mask

    def _augmented_patch(
        self,
        defect_image: torch.Tensor,
        defect_mask: torch.Tensor,
        generator: torch.Generator,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cut the defect's bounding box, jitter, flip and rotate it; return the patch and its defect mask.

        The box is first padded to a square as wide as its diagonal, so no rotation can push defect
        pixels out of the canvas. The image is padded by replicating its border, so interpolation at
        the defect's edge never blends in black.
        """
        rows, columns = _bounding_slices(defect_mask)
        box = defect_image[:, rows, columns].float()
        box_mask = defect_mask[rows, columns].float()
        side = math.ceil(math.hypot(*box_mask.shape))
        pad_height, pad_width = side - box_mask.shape[0], side - box_mask.shape[1]
        padding = (pad_width // 2, pad_width - pad_width // 2, pad_height // 2, pad_height - pad_height // 2)
        canvas = F.pad(box[None], padding, mode="replicate")
        canvas_mask = F.pad(box_mask[None, None], padding)

        with kornia_draws_from(generator):
            jittered = self.color_jitter(canvas)
            turned, turned_mask = self.geometric(jittered, canvas_mask)

        turned_mask = turned_mask[0, 0] > 0.5
        if not turned_mask.any():
            # Nearest-neighbour rotation can miss a defect of a pixel or two; keep it unrotated then.
            turned, turned_mask = jittered, canvas_mask[0, 0] > 0.5
        rows, columns = _bounding_slices(turned_mask)
        return turned[0, :, rows, columns], turned_mask[rows, columns]


def _bounding_slices(mask: torch.Tensor) -> tuple[slice, slice]:
    """Rows and columns of the smallest box that holds every true pixel of a non-empty 2-D mask."""
    rows = torch.nonzero(mask.any(dim=1)).flatten()
    columns = torch.nonzero(mask.any(dim=0)).flatten()
    return slice(int(rows[0]), int(rows[-1]) + 1), slice(int(columns[0]), int(columns[-1]) + 1)
